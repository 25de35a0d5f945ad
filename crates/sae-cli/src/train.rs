//! `sae train` and `sae eval`: the training config from a file and flags, and evaluation of a
//! run or of weights on a dataset. Training runs `sae_train::train`, the code path of the xtask
//! reproduction commands.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use sae_data::{CifarKind, HubSource, LabelSet};
use sae_models::{config, Implementation, Model};
use sae_train::{DataConfig, DatasetKind, OptimizerConfig, Schedule, TrainConfig};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The dataset's layout.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetArg {
    /// CIFAR-10 binary batches.
    Cifar10,
    /// CIFAR-100 binary files, 100 fine labels.
    Cifar100,
    /// CIFAR-100 binary files, 20 coarse labels.
    Cifar100Coarse,
    /// An ImageNet-style folder with train/ and val/ (one subfolder per class).
    Folder,
}

/// The data flags shared by `train` and `eval`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// Dataset directory, or `hub:cifar10`, `hub:cifar100` or `hub:OWNER/NAME[@REVISION]` (an
    /// image-classification dataset of parquet shards, converted once to a folder) from the
    /// Hugging Face Hub into its cache (HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE apply).
    #[arg(long)]
    pub data: Option<String>,
    /// The dataset's layout (default: recognised from the directory).
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetArg>,
    /// Input side length (default 32 for CIFAR, 224 for folders).
    #[arg(long)]
    pub input_size: Option<usize>,
    /// Train on a seeded subset of this many images.
    #[arg(long)]
    pub train_images: Option<usize>,
    /// Evaluate on a seeded subset of this many images.
    #[arg(long)]
    pub eval_images: Option<usize>,
    /// For a folder without val/ (class folders in train/ or at the top): hold out this
    /// fraction of each class's images for evaluation, the same images for every seed.
    #[arg(long)]
    pub val_fraction: Option<f64>,
}

/// Every setting of a run; each overrides the config file when given.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Where the run goes (config.json, summary.csv, train.log, curves.png, checkpoints/).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint (mid-epoch included); only --epochs
    /// may change.
    #[arg(long)]
    pub resume: bool,
    /// A training config JSON to start from (a run's config.json is one).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Registered model name (see `sae models`).
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Stem: `imagenet` (7×7/2 conv and max-pool) or `cifar` (3×3/1 conv, no pool).
    #[arg(long, value_parser = ["imagenet", "cifar"])]
    pub stem: Option<String>,
    /// How the SE/SaE gates scale the features: `s` (u·s) or `one_plus_s` (u + u·s).
    #[arg(long)]
    pub gate: Option<sae_models::Gate>,
    /// SE/SaE reduction r (each reduction layer maps C → C/r).
    #[arg(long)]
    pub reduction: Option<usize>,
    /// SaE cardinality K (parallel reduction layers).
    #[arg(long)]
    pub cardinality: Option<usize>,
    /// Convolutions with a bias (Keras style).
    #[arg(long)]
    pub conv_bias: Option<bool>,
    /// BatchNorm ε.
    #[arg(long)]
    pub bn_eps: Option<f64>,
    /// `adam` (Keras form), `adamw` (PyTorch's AdamW: decoupled weight decay, default 1e-2) or
    /// `sgd` (momentum, PyTorch form).
    #[arg(long, value_parser = ["adam", "adamw", "sgd"])]
    pub optimizer: Option<String>,
    /// Learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Adam's (and AdamW's) β₁.
    #[arg(long)]
    pub beta1: Option<f64>,
    /// Adam's β₂.
    #[arg(long)]
    pub beta2: Option<f64>,
    /// Adam's (and AdamW's) ε.
    #[arg(long)]
    pub adam_eps: Option<f64>,
    /// SGD momentum.
    #[arg(long)]
    pub momentum: Option<f64>,
    /// SGD Nesterov momentum.
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay: SGD's (L2, or --decoupled), AdamW's (decoupled).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// SGD weight decay decoupled from the gradient (AdamW style) instead of L2.
    #[arg(long)]
    pub decoupled: bool,
    /// `constant`, `step` (×gamma every --step-every epochs) or `cosine` (linear warm-up, then cosine).
    #[arg(long, value_parser = ["constant", "step", "cosine"])]
    pub schedule: Option<String>,
    /// Warm-up epochs of the cosine schedule.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_epochs: f64,
    /// Final learning rate of the cosine schedule.
    #[arg(long, default_value_t = 0.0)]
    pub min_lr: f64,
    /// Epochs between decays of the step schedule.
    #[arg(long, default_value_t = 30)]
    pub step_every: usize,
    /// Decay factor of the step schedule.
    #[arg(long, default_value_t = 0.1)]
    pub gamma: f64,
    /// Epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Seed of initialisation, shuffling and augmentation.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Several runs, one per seed (`0-4` or `0,3,7`), each in --out/seed-N, one after another;
    /// a run already there is resumed, or kept when finished. `sae compare` takes --out.
    #[arg(long, conflicts_with_all = ["seed", "resume"], value_parser = parse_seeds)]
    pub seeds: Option<Seeds>,
    /// Label smoothing ε.
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Batches per optimiser step (gradient accumulation).
    #[arg(long)]
    pub accumulate: Option<usize>,
    /// Clip the gradients' global L2 norm to this.
    #[arg(long)]
    pub clip_grad_norm: Option<f64>,
    /// Keep and evaluate an exponential moving average of the weights with this decay.
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Also checkpoint every N optimiser steps (a killed run loses at most N).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Before each evaluation, recalibrate BatchNorm's running statistics on this many
    /// training batches.
    #[arg(long)]
    pub recalibrate_bn: Option<usize>,
    /// Under `mpirun`: BatchNorm's batch statistics over every process's images (synchronised
    /// BatchNorm), as one process with the whole batch would compute them.
    #[arg(long)]
    pub sync_bn: bool,
    /// A TrivialAugment-style policy on every training image.
    #[arg(long)]
    pub trivial_augment: bool,
    /// Mixup with Beta(α, α) (timm uses 0.8).
    #[arg(long)]
    pub mixup: Option<f64>,
    /// CutMix with Beta(α, α) (timm uses 1.0).
    #[arg(long)]
    pub cutmix: Option<f64>,
    /// Probability that a batch is mixed.
    #[arg(long)]
    pub mix_prob: Option<f64>,
    /// With both mixup and CutMix, the probability of CutMix.
    #[arg(long)]
    pub mix_switch_prob: Option<f64>,
    /// Start from these weights (safetensors or a PyTorch checkpoint, or `hf:OWNER/NAME[@REV]`,
    /// e.g. hf:timm/resnet50.a1_in1k, downloaded from the Hugging Face Hub); a head of another
    /// class count is replaced (fine-tuning), and from a plain ResNet's weights an SE-ResNet's or
    /// SENetV2's excitation modules start fresh.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// `fused` kernels or the `reference` Candle compositions.
    #[arg(long)]
    pub kernels: Option<Implementation>,
    /// `f32`, or `bf16` mixed precision: bf16 activations, f32 master weights, optimiser state,
    /// BatchNorm statistics and loss (on the CPU the arithmetic stays f32: bf16 storage).
    #[arg(long)]
    pub precision: Option<sae_models::Precision>,
    /// `cpu`, `cuda` or `metal`.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    pub device: String,
}

/// The evaluation flags.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// A run directory: its config, data and best checkpoint (or --last).
    pub run: Option<PathBuf>,
    /// With a run: its last checkpoint instead of the best.
    #[arg(long)]
    pub last: bool,
    /// Weights to evaluate (with --config or --model, and --data).
    #[arg(long, conflicts_with = "run")]
    pub weights: Option<PathBuf>,
    /// The model config JSON of --weights (a run's config.json or `sae convert`'s).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A registered model name for --weights (classes from the data).
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Where the confusion matrix PNG goes (default: confusion.png in the run, else none).
    #[arg(long)]
    pub confusion: Option<PathBuf>,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// `cpu`, `cuda` or `metal`.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    pub device: String,
}

/// The device `--device` names, or an error saying what is missing and how to get it.
pub fn device(name: &str) -> Result<Device> {
    Ok(sae_train::device(name, 0)?)
}

/// The data directory, downloading CIFAR from the Hub for `hub:…`.
fn data_dir(data: &str, dataset: Option<DatasetArg>) -> Result<(PathBuf, Option<DatasetArg>)> {
    let hub = |kind: CifarKind| -> Result<PathBuf> {
        let source = HubSource::for_kind(kind);
        sae_data::prepare_cifar(kind, &source).with_context(|| {
            format!("getting {} from the Hugging Face Hub; without a network pass --data DIR", source.repo)
        })
    };
    Ok(match data {
        "hub:cifar10" => (hub(CifarKind::Cifar10)?, Some(DatasetArg::Cifar10)),
        "hub:cifar100" => {
            let coarse = dataset == Some(DatasetArg::Cifar100Coarse);
            let labels = if coarse { LabelSet::Coarse } else { LabelSet::Fine };
            (hub(CifarKind::Cifar100(labels))?, Some(dataset.unwrap_or(DatasetArg::Cifar100)))
        }
        other if other.starts_with("hub:") => {
            // Any image-classification dataset of parquet shards, as an ImageNet-style folder.
            let spec = &other[4..];
            let (repo, revision) = spec.split_once('@').unwrap_or((spec, "main"));
            if repo.split('/').count() != 2 {
                bail!("{other:?}: expected hub:OWNER/NAME[@REVISION], hub:cifar10 or hub:cifar100");
            }
            let dir = sae_data::prepare_image_folder(repo, revision)
                .with_context(|| format!("getting {repo} from the Hugging Face Hub"))?;
            (dir, Some(DatasetArg::Folder))
        }
        dir => (PathBuf::from(dir), dataset),
    })
}

/// The dataset in `dir`, as given or recognised from its files.
fn dataset_kind(dir: &Path, given: Option<DatasetArg>) -> Result<DatasetKind> {
    let arg = match given {
        Some(a) => a,
        // Either split's file: `sae eval` needs only the test split.
        None if dir.join("data_batch_1.bin").is_file() || dir.join("test_batch.bin").is_file() => DatasetArg::Cifar10,
        None if dir.join("train.bin").is_file() || dir.join("test.bin").is_file() => DatasetArg::Cifar100,
        None if dir.join("train").is_dir() => DatasetArg::Folder,
        // Class folders at the top (torchvision's `ImageFolder` layout), evaluated on a held-out fraction.
        None if has_class_folders(dir) => DatasetArg::Folder,
        None => bail!(
            "{}: not a CIFAR-10/100 binary directory or a folder of class folders (train/ and val/, or class folders with --val-fraction; or pass --dataset)",
            dir.display()
        ),
    };
    Ok(match arg {
        DatasetArg::Cifar10 => DatasetKind::Cifar10,
        DatasetArg::Cifar100 => DatasetKind::Cifar100Fine,
        DatasetArg::Cifar100Coarse => DatasetKind::Cifar100Coarse,
        DatasetArg::Folder => DatasetKind::Folder,
    })
}

/// Whether `dir` holds a folder with JPEG or PNG images in it (a class folder).
fn has_class_folders(dir: &Path) -> bool {
    let entries = |d: &Path| std::fs::read_dir(d).into_iter().flatten().flatten().map(|e| e.path());
    entries(dir).any(|sub| sub.is_dir() && entries(&sub).any(|f| sae_data::folder::is_image_file(&f)))
}

fn class_count(kind: DatasetKind, dir: &Path) -> Result<usize> {
    Ok(match kind {
        DatasetKind::Cifar10 => 10,
        DatasetKind::Cifar100Fine => 100,
        DatasetKind::Cifar100Coarse => 20,
        DatasetKind::Folder => sae_data::ImageFolder::class_names(&sae_train::data::folder_train_root(dir))?.len(),
    })
}

impl DataArgs {
    /// The data config these flags describe, on top of `base`.
    fn apply(&self, base: Option<DataConfig>) -> Result<DataConfig> {
        let mut cfg = match (&self.data, base) {
            (Some(data), base) => {
                let (dir, dataset) = data_dir(data, self.dataset)?;
                let kind = dataset_kind(&dir, dataset)?;
                let input_size = if kind == DatasetKind::Folder { 224 } else { 32 };
                let keep = base.filter(|b| b.dataset == kind);
                DataConfig {
                    dataset: kind,
                    dir,
                    input_size: keep.as_ref().map_or(input_size, |b| b.input_size),
                    train_images: keep.as_ref().and_then(|b| b.train_images),
                    eval_images: keep.as_ref().and_then(|b| b.eval_images),
                    val_fraction: keep.as_ref().and_then(|b| b.val_fraction),
                }
            }
            (None, Some(base)) => base,
            (None, None) => bail!("give --data DIR (or --config with a data section)"),
        };
        if let Some(d) = self.dataset {
            cfg.dataset = dataset_kind(&cfg.dir, Some(d))?;
        }
        set(&mut cfg.input_size, self.input_size);
        set(&mut cfg.train_images, self.train_images.map(Some));
        set(&mut cfg.eval_images, self.eval_images.map(Some));
        set(&mut cfg.val_fraction, self.val_fraction.map(Some));
        Ok(cfg)
    }
}

/// Overrides `field` with a flag's value when the flag was given.
fn set<T>(field: &mut T, flag: Option<T>) {
    if let Some(v) = flag {
        *field = v;
    }
}

/// The run's config: the file (or defaults), then every flag given.
pub fn train_config(a: &TrainArgs) -> Result<TrainConfig> {
    let base = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Some(
                serde_json::from_str::<TrainConfig>(&text)
                    .with_context(|| format!("{}: not a training config", path.display()))?,
            )
        }
        None => None,
    };
    let data = a.data.apply(base.as_ref().map(|b| b.data.clone()))?;
    let classes = class_count(data.dataset, &data.dir)?;
    let model = match (&a.model, &base) {
        (Some(name), _) => config(name, classes)?,
        (None, Some(b)) => b.model.clone(),
        (None, None) => bail!("give --model NAME (see `sae models`) or --config"),
    };
    let mut cfg = match base {
        Some(b) => TrainConfig { model, data, ..b },
        None => TrainConfig {
            model,
            data,
            optimizer: OptimizerConfig::keras_adam(),
            schedule: Schedule::Constant,
            epochs: 10,
            batch_size: 32,
            seed: 0,
            label_smoothing: 0.0,
            steps: Default::default(),
            augment: Default::default(),
            precision: Default::default(),
        },
    };
    // The head follows the data: a config file's model on another dataset gets a new head
    // (with --init, the backbone's weights and a freshly initialised classifier).
    cfg.model.num_classes = classes;
    if let Some(k) = a.kernels {
        cfg.model.kernels = k;
    }
    set(&mut cfg.precision, a.precision);
    match a.stem.as_deref() {
        Some("cifar") => cfg.model.stem = sae_models::Stem::Cifar,
        Some(_) => cfg.model.stem = sae_models::Stem::Imagenet,
        None => {}
    }
    set(&mut cfg.model.gate, a.gate);
    set(&mut cfg.model.reduction, a.reduction);
    set(&mut cfg.model.cardinality, a.cardinality);
    set(&mut cfg.model.conv_bias, a.conv_bias);
    set(&mut cfg.model.bn_eps, a.bn_eps);
    // Another optimiser than the config file's starts from its defaults.
    if let Some(name) = a.optimizer.as_deref().filter(|&name| name != cfg.optimizer.name()) {
        cfg.optimizer = OptimizerConfig::default_named(name).with_context(|| format!("unknown optimizer {name}"))?;
    }
    match &mut cfg.optimizer {
        OptimizerConfig::Adam { lr, beta1, beta2, eps } => {
            if a.momentum.is_some() || a.weight_decay.is_some() || a.nesterov || a.decoupled {
                bail!("--momentum, --weight-decay, --nesterov and --decoupled are SGD settings (--optimizer sgd)");
            }
            set(lr, a.lr);
            set(beta1, a.beta1);
            set(beta2, a.beta2);
            set(eps, a.adam_eps);
        }
        OptimizerConfig::AdamW { lr, beta1, beta2, eps, weight_decay } => {
            if a.momentum.is_some() || a.nesterov || a.decoupled {
                bail!("--momentum, --nesterov and --decoupled are SGD settings (--optimizer sgd); AdamW's weight decay is decoupled");
            }
            set(lr, a.lr);
            set(beta1, a.beta1);
            set(beta2, a.beta2);
            set(eps, a.adam_eps);
            set(weight_decay, a.weight_decay);
        }
        OptimizerConfig::Sgd { lr, momentum, nesterov, weight_decay, decoupled } => {
            if a.beta1.is_some() || a.beta2.is_some() || a.adam_eps.is_some() {
                bail!("--beta1, --beta2 and --adam-eps are Adam settings (--optimizer adam or adamw)");
            }
            set(lr, a.lr);
            set(momentum, a.momentum);
            set(weight_decay, a.weight_decay);
            *nesterov |= a.nesterov;
            *decoupled |= a.decoupled;
        }
    }
    set(&mut cfg.epochs, a.epochs);
    cfg.schedule = match a.schedule.as_deref() {
        Some("constant") => Schedule::Constant,
        Some("step") => Schedule::Step { every: a.step_every, gamma: a.gamma },
        Some("cosine") => {
            Schedule::Cosine { warmup_epochs: a.warmup_epochs, total_epochs: cfg.epochs as f64, min_lr: a.min_lr }
        }
        // A cosine schedule from a config file follows a new --epochs to its end.
        _ => match cfg.schedule {
            Schedule::Cosine { warmup_epochs, min_lr, .. } if a.epochs.is_some() => {
                Schedule::Cosine { warmup_epochs, total_epochs: cfg.epochs as f64, min_lr }
            }
            schedule => schedule,
        },
    };
    set(&mut cfg.batch_size, a.batch_size);
    set(&mut cfg.seed, a.seed);
    set(&mut cfg.label_smoothing, a.label_smoothing);
    let steps = &mut cfg.steps;
    set(&mut steps.accumulate, a.accumulate);
    set(&mut steps.recalibrate_bn, a.recalibrate_bn);
    set(&mut steps.clip_grad_norm, a.clip_grad_norm.map(Some));
    set(&mut steps.ema_decay, a.ema_decay.map(Some));
    set(&mut steps.checkpoint_every, a.checkpoint_every.map(Some));
    set(&mut steps.init, a.init.clone().map(Some));
    steps.sync_bn |= a.sync_bn;
    let augment = &mut cfg.augment;
    set(&mut augment.mixup_alpha, a.mixup);
    set(&mut augment.cutmix_alpha, a.cutmix);
    set(&mut augment.mix_prob, a.mix_prob);
    set(&mut augment.switch_prob, a.mix_switch_prob);
    augment.trivial_augment |= a.trivial_augment;
    cfg.validate()?;
    Ok(cfg)
}

/// `sae train`: one process, or one rank of several under `mpirun`.
pub fn train(a: &TrainArgs) -> Result<()> {
    let host = sae_train::dist::from_environment()?;
    let result = train_rank(a, host.clone());
    sae_train::dist::abort_all_on_error(&*host, &result);
    result
}

/// The seeds of `--seeds`, in the order given.
#[derive(Debug, Clone)]
pub struct Seeds(Vec<u64>);

/// `0-4` (both ends included) or `0,3,7`, or both mixed: `0-2,10`.
fn parse_seeds(text: &str) -> Result<Seeds, String> {
    let mut seeds = Vec::new();
    for part in text.split(',').map(str::trim) {
        let number =
            |s: &str| s.trim().parse::<u64>().map_err(|_| format!("{s:?} in {text:?} is not a seed (a whole number)"));
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (number(from)?, number(to)?);
                if from > to {
                    return Err(format!("{part:?}: the range runs backwards"));
                }
                seeds.extend(from..=to);
            }
            None => seeds.push(number(part)?),
        }
    }
    let mut unique = seeds.clone();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() != seeds.len() {
        return Err(format!("{text:?} names a seed twice"));
    }
    Ok(Seeds(seeds))
}

fn train_rank(a: &TrainArgs, host: std::sync::Arc<dyn sae_train::Collective>) -> Result<()> {
    let is_root = host.rank() == 0;
    // One GPU per process of a machine.
    let dev = sae_train::device(&a.device, sae_train::dist::local_rank())?;
    let collective = sae_train::dist::for_device(host, &dev)?;
    if let Some(Seeds(seeds)) = &a.seeds {
        let base = train_config(a)?;
        let mut last_top1 = Vec::new();
        for &seed in seeds {
            let cfg = TrainConfig { seed, ..base.clone() };
            let dir = a.out.join(format!("seed-{seed}"));
            // A run already there goes on (or, finished, is kept); its config must match. Rank
            // 0's look decides (`train_with` hands its opening to the others).
            let resume = dir.join(sae_train::config::CONFIG_FILE).is_file();
            let history = train_one(&cfg, &dir, &dev, resume, is_root, collective.clone())?;
            last_top1.extend(history.last().map(|e| e.eval_top1));
        }
        if is_root && last_top1.len() > 1 {
            eprintln!(
                "{} seeds: eval top-1 {} (mean ± std [95 % interval]); `sae compare {}` compares them with other settings",
                last_top1.len(),
                sae_train::stats::mean_spread_text(&last_top1),
                a.out.display()
            );
        }
        return Ok(());
    }
    let cfg = if a.resume {
        let mut cfg = TrainConfig::read(&a.out).with_context(|| format!("resuming the run in {}", a.out.display()))?;
        if let Some(e) = a.epochs {
            cfg.epochs = e;
        }
        cfg
    } else {
        train_config(a)?
    };
    train_one(&cfg, &a.out, &dev, a.resume, is_root, collective).map(drop)
}

/// Trains (or resumes) one run of `cfg` in `dir`, with the progress lines of `sae train`.
fn train_one(
    cfg: &TrainConfig,
    dir: &Path,
    dev: &Device,
    resume: bool,
    is_root: bool,
    collective: std::sync::Arc<dyn sae_train::Collective>,
) -> Result<Vec<sae_train::EpochSummary>> {
    let world = collective.world_size();
    if is_root {
        let processes = match world {
            1 => String::new(),
            n => format!(
                " × {n} processes ({}{})",
                collective.backend(),
                if cfg.steps.sync_bn { ", sync BN" } else { "" }
            ),
        };
        eprintln!(
            "training {} on {} ({} epochs, batch {}, {}{processes}) in {}",
            cfg.model.name,
            cfg.data.dir.display(),
            cfg.epochs,
            cfg.batch_size,
            cfg.precision.describe(dev),
            dir.display()
        );
    }
    let mut progress = sae_train::default_progress();
    let history = sae_train::train_with(cfg, dir, dev, resume, progress.as_mut(), collective)
        .with_context(|| format!("training {} in {}", cfg.model.name, dir.display()))?;
    if let (Some(last), true) = (history.last(), is_root) {
        eprintln!("done: eval top-1 {:.2}%, top-5 {:.2}% after {} epochs", last.eval_top1, last.eval_top5, last.epoch);
    }
    Ok(history)
}

/// A run's model with the weights it is evaluated with (`sae_train::checkpoint::run_weights`)
/// in its precision, and its config.
pub fn load_run(run: &Path, last: bool, dev: &Device) -> Result<(Model, TrainConfig)> {
    let cfg = TrainConfig::read(run).with_context(|| format!("{}: not a run directory", run.display()))?;
    let weights = sae_train::checkpoint::run_weights(run, last)?;
    let mut model = Model::load(cfg.model.clone(), &weights, dev)
        .with_context(|| format!("loading {} weights from {}", cfg.model.name, weights.display()))?;
    model.set_precision(cfg.precision);
    Ok((model, cfg))
}

/// `sae eval`.
pub fn eval(a: &EvalArgs) -> Result<()> {
    let dev = device(&a.device)?;
    let (model, data, seed, confusion) = match (&a.run, &a.weights) {
        (Some(run), _) => {
            let (model, cfg) = load_run(run, a.last, &dev)?;
            let data = a.data.apply(Some(cfg.data.clone()))?;
            (model, data, cfg.seed, Some(a.confusion.clone().unwrap_or_else(|| run.join("confusion.png"))))
        }
        (None, Some(weights)) => {
            // A run's config.json also says how its images were prepared (input size, held-out
            // fraction): the data flags go on top of that.
            let file = a.config.as_deref().map(crate::read_config).transpose()?;
            let (model, run_data) = file.map_or((None, None), |f| (Some(f.model), f.data));
            let data = a.data.apply(run_data)?;
            let cfg = match (model, &a.model) {
                (Some(cfg), _) => cfg,
                (None, Some(name)) => config(name, class_count(data.dataset, &data.dir)?)?,
                (None, None) => bail!("give --config or --model with --weights"),
            };
            let model =
                Model::load(cfg, weights, &dev).with_context(|| format!("loading weights {}", weights.display()))?;
            (model, data, 0, a.confusion.clone())
        }
        (None, None) => bail!("give a run directory, or --weights with --config/--model and --data"),
    };
    let (loader, classes) = sae_train::data::eval_loader(&data, seed, a.batch_size.max(1))?;
    if classes.len() != model.config().num_classes {
        bail!("the model has {} outputs but the data has {} classes", model.config().num_classes, classes.len());
    }
    let progress = crate::Progress::new(loader.dataset().len(), "evaluating");
    let result = dev.with_context(|| sae_train::evaluate_all_with(&model, &loader, &dev, &mut |n| progress.add(n)))?;
    progress.finish();
    if let Some(path) = &confusion {
        let title = format!("{}: confusion on {} images", model.config().name, result.images);
        sae_train::plot::plot_confusion(&result.confusion, &classes, &title, path)?;
    }
    let mut out = std::io::stdout().lock();
    let per_class = result.per_class();
    if a.json {
        let classes: Vec<_> = classes
            .iter()
            .zip(&per_class)
            .zip(&result.confusion)
            .map(|((name, acc), row)| serde_json::json!({"class": name, "images": row.iter().sum::<usize>(), "top1": acc}))
            .collect();
        let json = serde_json::json!({
            "model": model.config().name, "images": result.images, "loss": result.loss,
            "top1": result.top1, "top5": result.top5, "per_class": classes, "confusion": result.confusion,
        });
        writeln!(out, "{json}")?;
    } else {
        writeln!(
            out,
            "{}: {} images, loss {:.4}, top-1 {:.2}%, top-5 {:.2}%",
            model.config().name,
            result.images,
            result.loss,
            result.top1,
            result.top5
        )?;
        for (name, acc) in classes.iter().zip(&per_class) {
            match acc {
                Some(acc) => writeln!(out, "  {acc:>6.2}%  {name}")?,
                None => writeln!(out, "     —    {name} (no images)")?,
            }
        }
    }
    if let Some(path) = confusion {
        eprintln!("confusion matrix: {}", path.display());
    }
    Ok(())
}
