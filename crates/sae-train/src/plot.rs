//! PNG plots: a run's loss and accuracy curves (`curves.png`, rewritten after every epoch) and
//! a comparison of several runs' evaluation accuracy (one per reproduced table).
//!
//! Drawn with `plotters` into an RGB buffer and encoded with `image`, written through a
//! temporary file and a rename like every other output. Text uses the DejaVu Sans font bundled
//! in `assets/` (its licence beside it), so nothing depends on the fonts a machine has.

use crate::summary::EpochSummary;
use crate::{Error, Result};
use image::ImageEncoder;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is bundled and known good, so registration cannot fail in practice.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Plot { path: path.to_path_buf(), reason: e.to_string() }
}

/// One line of a plot: a label and (x, y) points, and optionally the runs it averages, drawn
/// as thin lines of the same colour beneath it.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points in x order.
    pub points: Vec<(f64, f64)>,
    /// The individual runs behind `points` (per seed), or empty.
    pub runs: Vec<Vec<(f64, f64)>>,
}

impl Series {
    /// Evaluation top-1 per epoch of `runs` (one setting's seeds): their mean over the epochs
    /// every run has, over each run's own line.
    pub fn eval_top1_over_seeds(label: String, runs: &[Vec<EpochSummary>]) -> Series {
        let epochs = runs.iter().map(Vec::len).min().unwrap_or(0);
        let points = (0..epochs)
            .map(|e| ((e + 1) as f64, runs.iter().map(|r| r[e].eval_top1).sum::<f64>() / runs.len() as f64))
            .collect();
        let runs = runs.iter().map(|r| r.iter().map(|s| (s.epoch as f64, s.eval_top1)).collect()).collect();
        Series { label, points, runs }
    }
}

/// Renders `draw` on a `width` × `height` canvas and writes it to `path` as PNG.
fn render(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> std::result::Result<(), String>,
) -> Result<()> {
    register_font();
    let mut rgb = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
        draw(root.clone()).map_err(|e| plot_error(path, e))?;
        root.present().map_err(|e| plot_error(path, e))?;
    }
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&rgb, width, height, image::ExtendedColorType::Rgb8)
        .map_err(|e| plot_error(path, e))?;
    Ok(sae_fs::write_atomic(path, &png)?)
}

/// Draws `series` on one panel with a title and axis names; the y range covers every point.
fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    (x_name, y_name): (&str, &str),
    series: &[Series],
    legend: SeriesLabelPosition,
) -> std::result::Result<(), String> {
    let points = || series.iter().flat_map(|s| s.points.iter().chain(s.runs.iter().flatten()));
    let x_max = points().map(|p| p.0).fold(1.0, f64::max);
    let (mut y_min, mut y_max) =
        points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if !y_min.is_finite() || !y_max.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc(x_name).y_desc(y_name).label_style((FAMILY, 14)).draw().map_err(|e| e.to_string())?;
    for (i, s) in series.iter().enumerate() {
        let thin = Palette99::pick(i).mix(0.35).stroke_width(1);
        for run in &s.runs {
            chart.draw_series(LineSeries::new(run.iter().copied(), thin)).map_err(|e| e.to_string())?;
        }
        let colour = Palette99::pick(i).to_rgba().stroke_width(if s.runs.is_empty() { 2 } else { 3 });
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), colour))
            .map_err(|e| e.to_string())?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, colour.filled()))).map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FAMILY, 14))
        .position(legend)
        .draw()
        .map_err(|e| e.to_string())
}

/// Writes a run's loss (train, eval) and accuracy (train top-1, eval top-1 and top-5) against
/// the epoch to `path`.
pub fn plot_run(history: &[EpochSummary], title: &str, path: &Path) -> Result<()> {
    let line = |label: &str, f: fn(&EpochSummary) -> f64| Series {
        label: label.to_string(),
        points: history.iter().map(|e| (e.epoch as f64, f(e))).collect(),
        runs: Vec::new(),
    };
    let loss = [line("train loss", |e| e.train_loss), line("eval loss", |e| e.eval_loss)];
    let accuracy = [
        line("train top-1", |e| e.train_top1),
        line("eval top-1", |e| e.eval_top1),
        line("eval top-5", |e| e.eval_top5),
    ];
    render(path, (1200, 480), |root| {
        let panels = root.split_evenly((1, 2));
        panel(
            &panels[0],
            &format!("{title}: loss"),
            ("epoch", "cross-entropy"),
            &loss,
            SeriesLabelPosition::UpperRight,
        )?;
        panel(&panels[1], &format!("{title}: accuracy"), ("epoch", "%"), &accuracy, SeriesLabelPosition::LowerRight)
    })
}

/// Writes one line per series (e.g. each model's mean eval top-1 per epoch) to `path`.
pub fn plot_comparison(series: &[Series], title: &str, y_name: &str, path: &Path) -> Result<()> {
    render(path, (900, 560), |root| panel(&root, title, ("epoch", y_name), series, SeriesLabelPosition::LowerRight))
}

/// Writes a confusion matrix (`confusion[true][predicted]`) to `path`: one cell per pair,
/// shaded by the share of the true class's images (rows sum to one), true classes down,
/// predictions across; class names label the axes when there are at most 30 classes.
pub fn plot_confusion(confusion: &[Vec<usize>], classes: &[String], title: &str, path: &Path) -> Result<()> {
    let k = confusion.len();
    let side = (24 * k as u32).clamp(360, 1600) + 160;
    render(path, (side, side), |root| {
        let named = k <= 30 && classes.len() == k;
        let label = |v: &i32| -> String {
            let i = *v as usize;
            if named {
                classes.get(i).cloned().unwrap_or_default()
            } else {
                i.to_string()
            }
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 20))
            .margin(12)
            .x_label_area_size(if named { 110 } else { 40 })
            .y_label_area_size(if named { 110 } else { 50 })
            .build_cartesian_2d(0i32..k as i32, k as i32..0i32)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("predicted")
            .y_desc("true")
            .x_labels(k.min(30))
            .y_labels(k.min(30))
            .x_label_formatter(&label)
            .y_label_formatter(&label)
            .label_style((FAMILY, 12))
            .draw()
            .map_err(|e| e.to_string())?;
        let cells = confusion.iter().enumerate().flat_map(|(t, row)| {
            let total = row.iter().sum::<usize>().max(1) as f64;
            row.iter().enumerate().map(move |(p, &n)| {
                let shade = 255 - (255.0 * n as f64 / total).round() as u8;
                let (t, p) = (t as i32, p as i32);
                Rectangle::new([(p, t), (p + 1, t + 1)], RGBColor(shade, shade, 255).filled())
            })
        });
        chart.draw_series(cells).map_err(|e| e.to_string())?;
        Ok(())
    })
}
