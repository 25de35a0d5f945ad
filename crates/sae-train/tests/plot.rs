//! The PNG plots: they decode, have the promised size, carry each series' colour, and a
//! path that cannot be written gives an error naming it.

use plotters::style::{Color, Palette, Palette99};
use sae_train::plot::{plot_comparison, plot_run, Series};
use sae_train::EpochSummary;

fn history() -> Vec<EpochSummary> {
    (1..=5)
        .map(|e| EpochSummary {
            epoch: e,
            train_loss: 3.0 / e as f64,
            train_top1: 10.0 * e as f64,
            eval_loss: 3.2 / e as f64,
            eval_top1: 9.0 * e as f64,
            eval_top5: 20.0 + 10.0 * e as f64,
            lr: 1e-3,
            seconds: 1.0,
            images_per_second: 10.0,
        })
        .collect()
}

/// Pixels of `png` with exactly the colour of series `i`.
fn pixels_of_series(png: &image::RgbImage, i: usize) -> usize {
    let (r, g, b) = Palette99::pick(i).to_rgba().rgb();
    png.pixels().filter(|p| p.0 == [r, g, b]).count()
}

#[test]
fn run_curves_and_comparison_are_real_pngs() {
    let dir = tempfile::Builder::new().prefix("sae-plot-").tempdir().unwrap();
    let dir = dir.path();
    let curves = dir.join("curves.png");
    plot_run(&history(), "resnet14b", &curves).unwrap();
    let png = image::open(&curves).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (1200, 480));
    // Loss panel: two series; accuracy panel: three (palette indices restart per panel).
    for i in 0..3 {
        assert!(pixels_of_series(&png, i) > 200, "series {i} is not drawn");
    }
    let series: Vec<Series> = (0..4)
        .map(|m| Series {
            label: format!("model {m}"),
            points: (1..=5).map(|e| (e as f64, (m * 10 + e) as f64)).collect(),
            // Two runs per model, one above and one below the mean.
            runs: [-2.0, 2.0].map(|d| (1..=5).map(|e| (e as f64, (m * 10 + e) as f64 + d)).collect()).to_vec(),
        })
        .collect();
    let table = dir.join("table.png");
    plot_comparison(&series, "Table 3", "top-1 %", &table).unwrap();
    let png = image::open(&table).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (900, 560));
    for i in 0..4 {
        assert!(pixels_of_series(&png, i) > 200, "model {i} is not drawn");
    }
    // No temporary file is left beside the outputs.
    let names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let bad = dir.join("missing-dir/curves.png");
    let err = plot_run(&history(), "x", &bad).unwrap_err().to_string();
    assert!(err.contains("missing-dir"), "{err}");
}
