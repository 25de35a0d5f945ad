//! `sae`: the command-line tool for the models of this workspace, built on the library crates
//! only. Subcommands: `train`, `eval`, `models` (every registered model with parameters and MACs), `convert`
//! (torchvision/timm checkpoints → our weights and config), `export` (ONNX, or a state dict
//! for torchvision/timm), `predict`
//! (top-k classes of images), `compare` (runs of several settings over their seeds) and `data
//! check` (decode every image of a folder dataset).
//! Errors print with their causes and exit with status 1.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand, ValueEnum};
use rayon::prelude::*;
use sae_data::{Normalize, Transform};
use sae_models::{config, list, read_labels, Model, ModelConfig, Preprocess};
use std::io::Write;
use std::path::{Path, PathBuf};

/// mimalloc instead of glibc's malloc: glibc's per-thread arenas keep freed activations, so
/// a ResNet-50 forward at 140×140, batch 16, peaked at 1.98 GB against 1.19 GB with mimalloc
/// (`results/train-speed.md` lists every row's peak).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod benchmark;
mod compare;
mod train;

#[derive(Parser)]
#[command(
    name = "sae",
    version,
    about = "SENetV2 / SE-ResNet / ResNet / MobileNet models: inspect, convert, export, predict"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every registered model with its parameters and multiply-accumulates.
    #[command(after_help = "Example:\n  sae models --classes 100 --size 32 --json")]
    Models {
        /// Classifier outputs the counts are for.
        #[arg(long, default_value_t = 1000)]
        classes: usize,
        /// Input side length the MACs are for.
        #[arg(long, default_value_t = 224)]
        size: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Converts a torchvision or timm checkpoint (.pth, .pt, .bin or .safetensors) into our
    /// weights (safetensors) and the config that matches them (the same path with .json).
    #[command(after_help = "Example:\n  sae convert seresnet50_timm.pth seresnet50.safetensors\n  \
                            # then: sae predict --weights seresnet50.safetensors --config seresnet50.json cat.jpg")]
    Convert {
        /// The PyTorch checkpoint, or `hf:OWNER/NAME[@REVISION]` (a Hub model repository's
        /// weights, e.g. hf:timm/seresnet50.a1_in1k).
        src: PathBuf,
        /// Where our weights go; the config goes beside them with the extension .json.
        dst: PathBuf,
    },
    /// Exports a model in eval mode with its weights.
    #[command(
        after_help = "Examples:\n  sae export --weights seresnet50.safetensors --config seresnet50.json --out seresnet50.onnx\n  \
                      sae export --run runs/a --out a.onnx\n  \
                      sae export --run runs/tuned-seresnet50 --format pytorch --out tuned.safetensors\n  \
                      # then in Python: timm.create_model(\"seresnet50\", num_classes=N)\n  \
                      #     .load_state_dict(safetensors.torch.load_file(\"tuned.safetensors\"))"
    )]
    Export {
        #[command(flatten)]
        model: ModelArgs,
        /// The format.
        #[arg(long, value_enum, default_value_t = Format::Onnx)]
        format: Format,
        /// The output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Top-k classes of images (JPEG or PNG files, or folders of them), as a table or JSON lines.
    #[command(after_help = "Examples:\n  sae predict --run runs/a photos/\n  \
                      sae predict --weights w.safetensors --config w.json --labels labels.txt --top 3 photos/")]
    Predict {
        #[command(flatten)]
        model: ModelArgs,
        /// Class names, one per line (default: a run's own).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Centre-crop side length (ImageNet preprocessing: resize to 256/224 of it, crop,
        /// normalise) [default: 224]. A run's images are prepared as its evaluation prepared them.
        #[arg(long, conflicts_with = "run")]
        size: Option<usize>,
        /// Classes per image.
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// Images per forward pass.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Image files or folders (searched recursively).
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Trains a model: any registered model on CIFAR-10/100 (a directory or the Hub) or an
    /// ImageNet-style folder, with every setting of the run as a flag or in a config file.
    #[command(
        after_help = "Examples:\n  sae train --model senetv2_resnet18 --data ~/data/imagenette --input-size 128 \\\n      \
                            --epochs 30 --optimizer sgd --lr 0.1 --schedule cosine --warmup-epochs 2 --out runs/a\n  \
                            sae train --config runs/a/config.json --seed 1 --out runs/b\n  \
                            sae train --config runs/a/config.json --seeds 0-4 --out runs/a5   # then: sae compare runs/a5\n  \
                            sae train --out runs/a --resume"
    )]
    Train(Box<train::TrainArgs>),
    /// Evaluates a run (its best checkpoint) or weights on data: loss, top-1, top-5,
    /// per-class accuracy and a confusion-matrix PNG.
    #[command(after_help = "Examples:\n  sae eval runs/a --json\n  \
                            sae eval --weights w.safetensors --config w.json --data ~/data/imagenette --confusion c.png")]
    Eval(Box<train::EvalArgs>),
    /// Compares runs of several settings over their seeds: evaluation top-1 per setting as
    /// mean ± std with a 95 % interval, and each pair's difference with its interval, p-value
    /// and verdict (paired by seed where the settings share seeds). A setting is everything in
    /// a run's config.json but its seed and the fields named by --ignore.
    #[command(after_help = "Examples:\n  \
                            sae train --config base.json --model senetv2_resnet18 --seeds 0-4 --out runs/v2\n  \
                            sae train --config base.json --model seresnet18 --seeds 0-4 --out runs/se\n  \
                            sae compare runs/v2 runs/se --plot top1.png\n  \
                            sae compare runs/*/seed-* --json --ignore data.dir")]
    Compare(compare::CompareArgs),
    /// Images/s of models on this machine: inference and training steps on random inputs, with
    /// the median step, its forward and backward parts, and the GFLOP/s they reach (as timm's
    /// benchmark.py reports PyTorch models).
    #[command(after_help = "Examples:\n  \
                            sae benchmark --model resnet50,seresnet50,senetv2_resnet50 --batch-size 16\n  \
                            sae benchmark --model all --input-size 32 --mode train --csv speed.csv\n  \
                            sae benchmark --config runs/a/config.json --precision bf16")]
    Benchmark(benchmark::BenchmarkArgs),
    /// Times the gradient all-reduce of data-parallel training between the processes of
    /// `mpirun` (one JSON line from rank 0: seconds, algorithm and bus GB/s).
    #[command(after_help = "Example (a ResNet-50's gradient, 25.6 M floats):\n  \
                            mpirun -np 2 sae allreduce-bench --elements 25557032")]
    AllreduceBench {
        /// f32 elements per all-reduce.
        #[arg(long, default_value_t = 25_557_032)]
        elements: usize,
        /// Timed all-reduces (the median is reported).
        #[arg(long, default_value_t = 10)]
        repeats: usize,
    },
    /// Dataset checks.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Decodes every image under a folder in parallel and lists the files that fail; exits
    /// with status 1 when there is one.
    #[command(after_help = "Example:\n  sae data check ~/data/imagenette")]
    Check {
        /// An ImageNet-style folder (or any folder of images).
        dir: PathBuf,
    },
}

#[derive(ValueEnum, Clone, Copy)]
enum Format {
    /// ONNX, opset 17.
    Onnx,
    /// A PyTorch state dict in safetensors, with the model's config beside it (.json): for
    /// bench/pytorch/senetv2.py's network of that config (any model of `sae models`), and for
    /// torchvision's or timm's model where one has the architecture.
    Pytorch,
}

/// Which model, and its weights: a training run, or weights with their config or model name.
#[derive(clap::Args)]
struct ModelArgs {
    /// A run directory of `sae train`: its model and best checkpoint (or --last).
    #[arg(long, conflicts_with_all = ["weights", "config", "model"])]
    run: Option<PathBuf>,
    /// With --run: its last checkpoint instead of the best.
    #[arg(long, requires = "run")]
    last: bool,
    /// Weights in safetensors (from training, `Model::save` or `sae convert`).
    #[arg(long, required_unless_present = "run")]
    weights: Option<PathBuf>,
    /// The model's config JSON (written by `sae convert`, or `model` in a run's config.json).
    #[arg(long, conflicts_with = "model")]
    config: Option<PathBuf>,
    /// A registered model name (see `sae models`), with --classes.
    #[arg(long, required_unless_present_any = ["config", "run"])]
    model: Option<String>,
    /// Classifier outputs, with --model.
    #[arg(long, default_value_t = 1000)]
    classes: usize,
}

impl ModelArgs {
    /// The model with its weights, and the run's config where it came from a run.
    fn load(&self) -> Result<(Model, Option<sae_train::TrainConfig>)> {
        if let Some(run) = &self.run {
            let (model, cfg) = train::load_run(run, self.last, &Device::Cpu)?;
            return Ok((model, Some(cfg)));
        }
        let weights = self.weights.as_ref().context("give --run, or --weights with --config or --model")?;
        let cfg = match (&self.config, &self.model) {
            (Some(path), _) => read_config(path)?.model,
            (None, Some(name)) => config(name, self.classes)?,
            (None, None) => bail!("give --config or --model"),
        };
        let name = cfg.name.clone();
        let model = Model::load(cfg, weights, &Device::Cpu)
            .with_context(|| format!("loading {name} weights from {}", weights.display()))?;
        Ok((model, None))
    }
}

/// What `--config` gives: a model, and where the file is a run's `config.json`, its data
/// section and precision.
struct ConfigFile {
    model: ModelConfig,
    /// How the run's images were prepared (input size, held-out fraction); `None` for a model
    /// config (`sae convert`'s).
    data: Option<sae_train::DataConfig>,
    /// The precision the run trained in; `None` for a model config.
    precision: Option<sae_models::Precision>,
}

/// A model config: a `ModelConfig` JSON, or a run's `config.json` (its `model`, `data` and
/// `precision` fields).
fn read_config(path: &Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let model = value.get("model").filter(|m| m.is_object()).unwrap_or(&value);
    let model: ModelConfig =
        serde_json::from_value(model.clone()).with_context(|| format!("{}: not a model config", path.display()))?;
    model.validate().with_context(|| format!("{}", path.display()))?;
    let data = value
        .get("data")
        .map(|data| {
            serde_json::from_value(data.clone()).with_context(|| format!("{}: its data section", path.display()))
        })
        .transpose()?;
    let precision = value
        .get("precision")
        .map(|p| serde_json::from_value(p.clone()).with_context(|| format!("{}: its precision", path.display())))
        .transpose()?;
    Ok(ConfigFile { model, data, precision })
}

fn main() {
    sae_kernels::shorten_candle_spin();
    sae_train::allocator::keep_freed_memory();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {}", error_message(&e));
        std::process::exit(1);
    }
}

/// `e` and its causes joined by ": ", as `{e:#}` prints them, but a cause whose text its
/// parent already ends with left out: the libraries' I/O errors name the file and say what the
/// system said, and also give the system's error as their source.
fn error_message(e: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in e.chain().map(|cause| cause.to_string()) {
        if message.is_empty() {
            message = cause;
        } else if !message.ends_with(&cause) {
            message = format!("{message}: {cause}");
        }
    }
    message
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Models { classes, size, json } => models(classes, size, json),
        Command::Convert { src: spec, dst } => {
            let src = sae_data::resolve_weights(&spec)?;
            let cfg =
                sae_models::convert_checkpoint(&src, &dst).with_context(|| format!("converting {}", spec.display()))?;
            eprintln!(
                "{} → {} ({}, {} classes) and {}",
                spec.display(),
                dst.display(),
                cfg.name,
                cfg.num_classes,
                dst.with_extension("json").display()
            );
            Ok(())
        }
        Command::Export { model: model_args, format: Format::Pytorch, out } => {
            let (model, _) = model_args.load()?;
            sae_models::export_pytorch_state_dict(&model, &out)
                .with_context(|| format!("writing {}", out.display()))?;
            let config = out.with_extension("json");
            eprintln!(
                "wrote {} and its config {}: in PyTorch, `senetv2.from_config(json.load(open(\"{}\")))` \
                 (bench/pytorch/senetv2.py) then `.load_state_dict(safetensors.torch.load_file(\"{}\"))`",
                out.display(),
                config.display(),
                config.display(),
                out.display()
            );
            match sae_models::pytorch_incompatibility(model.config()) {
                None => eprintln!("torchvision's or timm's {} loads it too", model.config().name),
                Some(why) => eprintln!("no torchvision or timm model takes it: {why}"),
            }
            Ok(())
        }
        Command::Export { model: model_args, format: Format::Onnx, out } => {
            let (model, run) = model_args.load()?;
            let metadata = match (&model_args.run, &run) {
                (Some(dir), Some(cfg)) => run_metadata(dir, cfg)?,
                _ => Vec::new(),
            };
            sae_models::export_onnx_with_metadata(&model, &out, &metadata)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {} (ONNX opset {})", out.display(), sae_models::onnx::OPSET);
            Ok(())
        }
        Command::Predict { model, labels, size, top, batch, json, images } => {
            predict(&model, labels.as_deref(), size, top, batch.max(1), json, &images)
        }
        Command::Data { command: DataCommand::Check { dir } } => data_check(&dir),
        Command::Train(args) => train::train(&args),
        Command::AllreduceBench { elements, repeats } => {
            let collective = sae_train::dist::from_environment()?;
            let timing = sae_train::dist::time_all_reduce(&*collective, elements, repeats)?;
            if collective.rank() == 0 {
                println!("{}", serde_json::to_string(&timing)?);
            }
            Ok(())
        }
        Command::Eval(args) => train::eval(&args),
        Command::Compare(args) => compare::compare(&args),
        Command::Benchmark(args) => benchmark::benchmark(&args),
    }
}

/// What an exported run's ONNX file says of its input and output, in its `metadata_props`:
/// `class_names` (a JSON array in output order, where the run kept them) and `preprocessing`
/// (JSON: the shorter side resized to `resize`, a centre crop of `crop`, RGB scaled to 0–1,
/// then `mean` subtracted and divided by `std` channel by channel: what `sae eval` does).
fn run_metadata(dir: &Path, cfg: &sae_train::TrainConfig) -> Result<Vec<(String, String)>> {
    let mut metadata = Vec::new();
    if let Some(names) = sae_train::config::read_class_names(dir)? {
        metadata.push(("class_names".into(), serde_json::to_string(&names)?));
    }
    let (transform, Normalize { mean, std }) = sae_train::data::eval_preprocessing(&cfg.data);
    let Transform::ResizeCenterCrop { resize, size } = transform else {
        bail!("the run's evaluation transform {transform:?} is not a centre crop")
    };
    // Each value as f32 prints it (0.485, not 0.48500001430511475).
    let decimal = |v: [f32; 3]| v.map(|x| x.to_string().parse::<f64>().expect("an f32 prints as a number"));
    let preprocessing = serde_json::json!({"resize": resize, "crop": size, "mean": decimal(mean), "std": decimal(std)});
    metadata.push(("preprocessing".into(), preprocessing.to_string()));
    Ok(metadata)
}

fn models(classes: usize, size: usize, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if !json {
        writeln!(out, "{:<26} {:>14} {:>14} {:>16}", "model", "params", "params (Keras)", format!("MACs @{size}²"))?;
    }
    for name in list() {
        let cfg = config(name, classes)?;
        let counts = cfg.param_counts()?;
        let macs = Model::new(cfg, 0, &Device::Cpu)?.macs(size, size);
        if json {
            let row = serde_json::json!({
                "model": name, "classes": classes, "params": counts.trainable,
                "params_keras": counts.keras, "input_size": size, "macs": macs,
            });
            writeln!(out, "{row}")?;
        } else {
            writeln!(out, "{name:<26} {:>14} {:>14} {:>16}", counts.trainable, counts.keras, macs)?;
        }
    }
    Ok(())
}

/// Image files among `paths`, folders searched recursively, in sorted order.
fn image_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading {}", dir.display()))?;
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out)?;
            } else if sae_data::folder::is_image_file(&path) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.exists() {
            out.push(p.clone());
        } else {
            bail!("{}: no such file or folder", p.display());
        }
    }
    Ok(out)
}

/// How `predict` turns an image file into an input.
enum Preparation {
    /// A run's: its evaluation transform and normalisation, the same arithmetic `sae eval` runs.
    Run(Transform, Normalize),
    /// ImageNet's evaluation preprocessing at a size.
    Imagenet(Preprocess),
}

impl Preparation {
    fn load(&self, path: &Path) -> Result<Tensor> {
        match self {
            Preparation::Run(transform, normalize) => {
                let image = sae_data::Rgb8Image::open(path)?;
                let size = transform.size();
                let mut input = vec![0f32; 3 * size * size];
                // The evaluation transform draws nothing at random: seed, epoch and index do not matter.
                transform.apply(&image, *normalize, 0, 0, 0, &mut input);
                Ok(Tensor::from_vec(input, (3, size, size), &Device::Cpu)?)
            }
            Preparation::Imagenet(preprocess) => Ok(preprocess.load(path)?),
        }
    }
}

fn predict(
    model_args: &ModelArgs,
    labels: Option<&Path>,
    size: Option<usize>,
    top: usize,
    batch: usize,
    json: bool,
    inputs: &[PathBuf],
) -> Result<()> {
    let (model, run) = model_args.load()?;
    let classes = model.config().num_classes;
    // The class names, and the file they came from.
    let labels = match (labels, &model_args.run) {
        (Some(path), _) => {
            Some((read_labels(path).with_context(|| format!("reading labels {}", path.display()))?, path.to_path_buf()))
        }
        (None, Some(dir)) => {
            let names = sae_train::config::read_class_names(dir)?;
            if names.is_none() {
                eprintln!(
                    "{} has no {} (a run from before it was kept): classes are shown by index; --labels names them",
                    dir.display(),
                    sae_train::config::CLASSES_FILE
                );
            }
            names.map(|names| (names, dir.join(sae_train::config::CLASSES_FILE)))
        }
        (None, None) => None,
    };
    if let Some((names, path)) = &labels {
        if names.len() != classes {
            bail!("{} has {} names but the model has {classes} classes", path.display(), names.len());
        }
    }
    let labels = labels.map(|(names, _)| names);
    let files = image_files(inputs)?;
    let preprocess = match &run {
        Some(cfg) => {
            let (transform, normalize) = sae_train::data::eval_preprocessing(&cfg.data);
            Preparation::Run(transform, normalize)
        }
        None => Preparation::Imagenet(Preprocess::imagenet(size.unwrap_or(224))),
    };
    let mut out = std::io::stdout().lock();
    let progress = Progress::new(files.len(), "predicting");
    for chunk in files.chunks(batch) {
        progress.add(chunk.len());
        // Decoding a photo takes about as long as a small model's forward: every thread decodes.
        let images = chunk.par_iter().map(|p| preprocess.load(p)).collect::<Result<Vec<_>, _>>()?;
        let predictions = model.top_k(&Tensor::stack(&images, 0)?, top.min(classes))?;
        for (path, predictions) in chunk.iter().zip(predictions) {
            let name = |class: usize| labels.as_ref().map_or_else(|| class.to_string(), |l| l[class].clone());
            if json {
                let top: Vec<_> = predictions
                    .iter()
                    .map(
                        |p| serde_json::json!({"class": p.class, "label": name(p.class), "probability": p.probability}),
                    )
                    .collect();
                writeln!(out, "{}", serde_json::json!({"image": path.display().to_string(), "top": top}))?;
            } else {
                writeln!(out, "{}", path.display())?;
                for p in predictions {
                    writeln!(out, "  {:>6.2}%  {}", 100.0 * p.probability, name(p.class))?;
                }
            }
        }
    }
    progress.finish();
    Ok(())
}

/// Progress of a long loop on stderr: a bar on a terminal, a plain line every tenth otherwise.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
    done: std::sync::atomic::AtomicUsize,
    what: &'static str,
}

impl Progress {
    pub(crate) fn new(total: usize, what: &'static str) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} eta {eta}") {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what);
            bar
        });
        Self { bar, total, done: Default::default(), what }
    }

    pub(crate) fn add(&self, n: usize) {
        let done = self.done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        match &self.bar {
            Some(bar) => bar.inc(n as u64),
            None => {
                let tenth = self.total.div_ceil(10).max(1);
                if done / tenth != (done - n) / tenth && done < self.total {
                    eprintln!("{} {done}/{}", self.what, self.total);
                }
            }
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn data_check(dir: &Path) -> Result<()> {
    let files = image_files(&[dir.to_path_buf()])?;
    if files.is_empty() {
        bail!("{}: no images (.jpg, .jpeg, .png: what the loaders read) found", dir.display());
    }
    let progress = Progress::new(files.len(), "checking");
    let bad: Vec<String> = files
        .par_iter()
        .filter_map(|path| {
            let result = sae_data::Rgb8Image::open(path).err().map(|e| e.to_string());
            progress.add(1);
            result
        })
        .collect();
    progress.finish();
    let mut out = std::io::stdout().lock();
    for line in &bad {
        writeln!(out, "{line}")?;
    }
    eprintln!("{} images checked, {} unreadable", files.len(), bad.len());
    if !bad.is_empty() {
        bail!("{} of {} images under {} cannot be decoded", bad.len(), files.len(), dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CIFAR-10 run's images are its evaluation's: at the run's own 32×32 the centre crop
    /// keeps every pixel, normalised with CIFAR-10's statistics (ImageNet's would differ).
    #[test]
    fn a_cifar_run_prepares_images_as_its_evaluation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let pixel = |x: u32, y: u32| image::Rgb([(7 * x + y) as u8, (3 * y) as u8, (x * y % 251) as u8]);
        image::RgbImage::from_fn(32, 32, pixel).save(&path).unwrap();
        let data = sae_train::DataConfig {
            dataset: sae_train::DatasetKind::Cifar10,
            dir: dir.path().into(),
            input_size: 32,
            train_images: None,
            eval_images: None,
            val_fraction: None,
        };
        let (transform, normalize) = sae_train::data::eval_preprocessing(&data);
        let input = Preparation::Run(transform, normalize).load(&path).unwrap();
        assert_eq!(input.dims(), [3, 32, 32]);
        let input: Vec<Vec<Vec<f32>>> = input.to_vec3().unwrap();
        let Normalize { mean, std } = Normalize::CIFAR10;
        for (y, x, c) in (0..32).flat_map(|y| (0..32).flat_map(move |x| (0..3).map(move |c| (y, x, c)))) {
            let expected = (pixel(x, y)[c] as f32 / 255.0 - mean[c]) / std[c];
            let got = input[c][y as usize][x as usize];
            assert!((got - expected).abs() < 1e-5, "channel {c} at ({x}, {y}): {got} against {expected}");
        }
    }
}
