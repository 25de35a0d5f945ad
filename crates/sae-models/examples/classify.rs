//! Classifies image files with a registered model and a safetensors weights file:
//!
//! ```text
//! cargo run -p sae-models --example classify -- --model NAME --weights FILE [--labels FILE] IMAGE...
//! ```

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Parser;
use sae_models::{config, read_labels, Model, Preprocess};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Top-k classes of images with a SENetV2 / SE / ResNet / MobileNet model")]
struct Args {
    /// Registered model name (see `cargo xtask params` for the list).
    #[arg(long)]
    model: String,
    /// Weights in safetensors, as written by `Model::save` or training.
    #[arg(long)]
    weights: PathBuf,
    /// Class names, one per line; the number of lines sets the number of classes.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Number of classes when no labels file is given.
    #[arg(long, default_value_t = 1000)]
    num_classes: usize,
    /// Input size (the centre crop side).
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Classes to print per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Images to classify (JPEG or PNG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let labels = match &args.labels {
        Some(path) => Some(read_labels(path).with_context(|| format!("reading labels {}", path.display()))?),
        None => None,
    };
    let num_classes = labels.as_ref().map_or(args.num_classes, Vec::len);
    let cfg = config(&args.model, num_classes)?;
    let model = Model::load(cfg, &args.weights, &Device::Cpu)
        .with_context(|| format!("loading {} weights from {}", args.model, args.weights.display()))?;
    let preprocess = Preprocess::imagenet(args.size);
    let images = args.images.iter().map(|p| preprocess.load(p)).collect::<Result<Vec<_>, _>>()?;
    let batch = Tensor::stack(&images, 0)?;
    for (path, predictions) in args.images.iter().zip(model.top_k(&batch, args.top)?) {
        println!("{}", path.display());
        for p in predictions {
            let name = labels.as_ref().map_or_else(|| format!("class {}", p.class), |l| l[p.class].clone());
            println!("  {:>6.2}%  {name}", 100.0 * p.probability);
        }
    }
    Ok(())
}
