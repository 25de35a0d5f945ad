//! `sae compare`: runs of several settings, several seeds each, side by side with the statistics
//! the reproduction reports use (`sae_train::stats`): per setting the evaluation top-1 as mean ±
//! sample std with a 95 % Student-t interval, and for each pair of settings the difference with
//! its interval, p-value and verdict, paired by seed where the settings share seeds.
//!
//! A setting is everything in a run's `config.json` but its seed and the fields `--ignore` names
//! (runs made from another copy of the data, `data.dir`, or with the other kernel switch,
//! `model.kernels`, are otherwise other settings); each is named by the fewest fields that tell
//! the settings apart (`model.name=seresnet18`, `optimizer.lr=0.1`). Runs that have not
//! finished their epochs are left out unless asked for.

use anyhow::{bail, Context, Result};
use sae_train::plot::Series;
use sae_train::stats::{self, Estimate, Verdict};
use sae_train::summary::last_three_top1;
use sae_train::{read_summary, EpochSummary, TrainConfig};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The flags of `sae compare`.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Run directories, or folders holding run directories (one level down).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// One JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also compare runs that have not finished their epochs (at their last finished one).
    #[arg(long)]
    pub unfinished: bool,
    /// Also plot evaluation top-1 per epoch to this PNG: each setting's mean over its seeds,
    /// over a thin line per run.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// A config field that does not make runs different settings, by its dotted path
    /// (`data.dir`) or a whole section (`data`); may be repeated.
    #[arg(long, value_name = "FIELD")]
    pub ignore: Vec<String>,
}

/// One run's outcome.
struct RunResult {
    dir: PathBuf,
    seed: u64,
    /// Epochs the run's config plans.
    planned_epochs: usize,
    /// Every finished epoch (one at least: runs without are left out).
    history: Vec<EpochSummary>,
}

impl RunResult {
    fn last(&self) -> &EpochSummary {
        self.history.last().expect("a compared run has finished an epoch")
    }

    /// Evaluation top-1 of the last epoch.
    fn top1(&self) -> f64 {
        self.last().eval_top1
    }

    /// Evaluation top-5 of the last epoch.
    fn top5(&self) -> f64 {
        self.last().eval_top5
    }

    /// Evaluation top-1 averaged over the last three epochs.
    fn last3(&self) -> f64 {
        last_three_top1(&self.history)
    }
}

/// The runs of one setting, by seed.
struct Setting {
    config: BTreeMap<String, String>,
    runs: Vec<RunResult>,
}

/// `sae compare`.
pub fn compare(a: &CompareArgs) -> Result<()> {
    let mut settings: Vec<Setting> = Vec::new();
    let ignored = |key: &str| a.ignore.iter().any(|f| ignored_by(key, f));
    // Every field of the runs' configs, so that an `--ignore` that names none is an error.
    let mut fields = std::collections::BTreeSet::new();
    for dir in run_dirs(&a.runs)? {
        let cfg = TrainConfig::read(&dir).with_context(|| format!("{}: not a run directory", dir.display()))?;
        // A run writes its summary after its first epoch.
        let history = if dir.join("summary.csv").is_file() { read_summary(&dir)? } else { Vec::new() };
        let Some(last) = history.last() else {
            eprintln!("{}: no epoch finished yet, left out", dir.display());
            continue;
        };
        if last.epoch < cfg.epochs && !a.unfinished {
            eprintln!(
                "{}: {} of {} epochs finished, left out (--unfinished keeps it)",
                dir.display(),
                last.epoch,
                cfg.epochs
            );
            continue;
        }
        let run = RunResult { seed: cfg.seed, planned_epochs: cfg.epochs, dir, history };
        let mut config = flatten(&setting_of(&cfg)?);
        fields.extend(config.keys().cloned());
        config.retain(|key, _| !ignored(key));
        match settings.iter_mut().find(|s| s.config == config) {
            Some(s) => {
                if let Some(twin) = s.runs.iter().find(|r| r.seed == run.seed) {
                    bail!(
                        "{} and {} are the same setting with the same seed {}: compare one of them",
                        twin.dir.display(),
                        run.dir.display(),
                        run.seed
                    );
                }
                s.runs.push(run);
            }
            None => settings.push(Setting { config, runs: vec![run] }),
        }
    }
    if settings.is_empty() {
        bail!("no run to compare among {}", describe(&a.runs));
    }
    if let Some(unknown) = a.ignore.iter().find(|f| !fields.iter().any(|key| ignored_by(key, f))) {
        let sections: std::collections::BTreeSet<&str> =
            fields.iter().map(|k| k.split('.').next().unwrap_or(k)).collect();
        bail!(
            "--ignore {unknown}: no run's config has that field (fields are dotted paths such as data.dir, or sections: {})",
            sections.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    for s in &mut settings {
        s.runs.sort_by_key(|r| r.seed);
    }
    let names = setting_names(&settings);
    let comparisons = comparisons(&settings, &names);
    if let Some(path) = &a.plot {
        let series: Vec<Series> = settings
            .iter()
            .zip(&names)
            .map(|(s, name)| {
                let histories: Vec<Vec<EpochSummary>> = s.runs.iter().map(|r| r.history.clone()).collect();
                Series::eval_top1_over_seeds(name.clone(), &histories)
            })
            .collect();
        sae_train::plot::plot_comparison(&series, "evaluation top-1, mean over seeds", "top-1 %", path)?;
        eprintln!("plot: {}", path.display());
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", json!({"settings": settings_json(&settings, &names), "comparisons": comparisons}))?;
    } else {
        write!(out, "{}", render(&settings, &names, &comparisons))?;
    }
    Ok(())
}

/// The run directories among `paths`: each path that holds a `config.json`, else its
/// subdirectories that do (sorted).
fn run_dirs(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let is_run = |p: &Path| p.join(sae_train::config::CONFIG_FILE).is_file();
    let mut dirs = Vec::new();
    for path in paths {
        if is_run(path) {
            dirs.push(path.clone());
            continue;
        }
        let entries = std::fs::read_dir(path).with_context(|| format!("{}: not a run directory", path.display()))?;
        let mut inner: Vec<PathBuf> = entries
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading {}", path.display()))?;
        inner.retain(|p| is_run(p));
        if inner.is_empty() {
            bail!("{}: neither a run directory nor a folder of runs (no config.json)", path.display());
        }
        inner.sort();
        dirs.extend(inner);
    }
    Ok(dirs)
}

fn describe(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Whether `--ignore field` covers the config field `key`: the field itself, or a field of
/// that section.
fn ignored_by(key: &str, field: &str) -> bool {
    key.strip_prefix(field).is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// A run's config without its seed: what makes runs the same setting.
fn setting_of(cfg: &TrainConfig) -> Result<Value> {
    let mut value = serde_json::to_value(cfg)?;
    if let Value::Object(fields) = &mut value {
        fields.remove("seed");
    }
    Ok(value)
}

/// `value`'s leaves by dotted path (`optimizer.lr`), each as JSON text.
fn flatten(value: &Value) -> BTreeMap<String, String> {
    fn walk(value: &Value, path: &str, out: &mut BTreeMap<String, String>) {
        match value {
            Value::Object(fields) => {
                for (k, v) in fields {
                    walk(v, &if path.is_empty() { k.clone() } else { format!("{path}.{k}") }, out);
                }
            }
            Value::String(s) => {
                out.insert(path.to_string(), s.clone());
            }
            leaf => {
                out.insert(path.to_string(), leaf.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(value, "", &mut out);
    out
}

/// Each setting's name: `key=value` of the fields that tell the settings apart (`—` where a
/// setting lacks the field), "all runs" for a single setting. Fields are taken in turn, the
/// model's name first and the rest in alphabetical order, each where it separates two settings
/// the fields before it do not (a model's name makes its architecture fields redundant).
fn setting_names(settings: &[Setting]) -> Vec<String> {
    let value = |s: &Setting, k: &str| s.config.get(k).map_or("—", String::as_str).to_string();
    let mut keys: Vec<&String> =
        settings.iter().flat_map(|s| s.config.keys()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    keys.sort_by_key(|k| k.as_str() != "model.name");
    let mut chosen: Vec<&String> = Vec::new();
    let name = |s: &Setting, chosen: &[&String]| chosen.iter().map(|k| value(s, k)).collect::<Vec<_>>();
    for key in keys {
        let separates = (0..settings.len()).any(|i| {
            (i + 1..settings.len()).any(|j| {
                name(&settings[i], &chosen) == name(&settings[j], &chosen)
                    && value(&settings[i], key) != value(&settings[j], key)
            })
        });
        if separates {
            chosen.push(key);
        }
    }
    settings
        .iter()
        .map(|s| {
            let parts: Vec<String> = chosen.iter().map(|k| format!("{k}={}", value(s, k))).collect();
            if parts.is_empty() {
                "all runs".into()
            } else {
                parts.join(", ")
            }
        })
        .collect()
}

fn settings_json(settings: &[Setting], names: &[String]) -> Vec<Value> {
    settings
        .iter()
        .zip(names)
        .map(|(s, name)| {
            let summary = |values: Vec<f64>| {
                let e = stats::mean_interval(&values);
                let (lo, hi) = e.interval();
                json!({"mean": e.mean, "std": stats::mean_std(&values).1, "low": finite(lo), "high": finite(hi)})
            };
            json!({
                "setting": name,
                "runs": s.runs.iter().map(|r| json!({
                    "dir": r.dir.display().to_string(), "seed": r.seed, "top1": r.top1(), "top5": r.top5(),
                    "top1_last3": r.last3(), "epochs": r.last().epoch, "epochs_planned": r.planned_epochs,
                })).collect::<Vec<_>>(),
                "top1": summary(s.runs.iter().map(|r| r.top1()).collect()),
                "top5": summary(s.runs.iter().map(|r| r.top5()).collect()),
                "top1_last3": summary(s.runs.iter().map(|r| r.last3()).collect()),
            })
        })
        .collect()
}

/// `v`, or JSON null where it is not finite (an interval of one run).
fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// Every pair of settings: the difference in last-epoch top-1 and in the last-three-epoch mean,
/// paired by seed over the seeds both have (two or more), else Welch's test over all their runs.
fn comparisons(settings: &[Setting], names: &[String]) -> Vec<Value> {
    let mut out = Vec::new();
    for i in 0..settings.len() {
        for j in i + 1..settings.len() {
            let (a, b) = (&settings[i].runs, &settings[j].runs);
            let shared: Vec<(&RunResult, &RunResult)> =
                a.iter().filter_map(|x| b.iter().find(|y| y.seed == x.seed).map(|y| (x, y))).collect();
            // Paired: also the seeds a 1-point gap in the last-three-epoch mean would need at the
            // spread of the per-seed differences (80 % power, 5 % level).
            let (method, last, last3, seeds_for_1_point) = if shared.len() >= 2 {
                let pick = |f: fn(&RunResult) -> f64| -> (Vec<f64>, Vec<f64>) {
                    shared.iter().map(|(x, y)| (f(x), f(y))).unzip()
                };
                let ((xl, yl), (x3, y3)) = (pick(|r| r.top1()), pick(|r| r.last3()));
                let spread = stats::mean_std(&x3.iter().zip(&y3).map(|(x, y)| x - y).collect::<Vec<_>>()).1;
                (
                    format!("paired over {} seeds", shared.len()),
                    stats::paired(&xl, &yl),
                    stats::paired(&x3, &y3),
                    json!(stats::seeds_needed_paired(1.0, spread)),
                )
            } else {
                let all = |runs: &[RunResult], f: fn(&RunResult) -> f64| runs.iter().map(f).collect::<Vec<_>>();
                (
                    format!("Welch, {} against {} runs", a.len(), b.len()),
                    stats::welch(&all(a, |r| r.top1()), &all(b, |r| r.top1())),
                    stats::welch(&all(a, |r| r.last3()), &all(b, |r| r.last3())),
                    Value::Null,
                )
            };
            let estimate = |e: &Estimate| {
                let (lo, hi) = e.interval();
                json!({"difference": e.mean, "low": finite(lo), "high": finite(hi), "p": finite(e.p_value),
                       "verdict": Verdict::of(e).words()})
            };
            out.push(json!({
                "a": names[i], "b": names[j], "method": method,
                "top1": estimate(&last), "top1_last3": estimate(&last3), "seeds_for_1_point": seeds_for_1_point,
            }));
        }
    }
    out
}

/// The two tables, in Markdown.
fn render(settings: &[Setting], names: &[String], comparisons: &[Value]) -> String {
    let mut md = String::from(
        "| setting | runs | seeds | epochs | top-1 (last epoch) | top-1 (last 3 epochs) | top-5 |\n|---|---:|---|---|---|---|---|\n",
    );
    for (s, name) in settings.iter().zip(names) {
        let values = |f: fn(&RunResult) -> f64| s.runs.iter().map(f).collect::<Vec<_>>();
        let seeds: Vec<String> = s.runs.iter().map(|r| r.seed.to_string()).collect();
        let done: Vec<usize> = s.runs.iter().map(|r| r.last().epoch).collect();
        let (min, max) = (done.iter().min().copied().unwrap_or(0), done.iter().max().copied().unwrap_or(0));
        let planned = s.runs[0].planned_epochs;
        let epochs = if min == max { format!("{min}/{planned}") } else { format!("{min}–{max}/{planned}") };
        md += &format!(
            "| {name} | {} | {} | {epochs} | {} | {} | {} |\n",
            s.runs.len(),
            seeds.join(", "),
            stats::mean_spread_text(&values(|r| r.top1())),
            stats::mean_spread_text(&values(|r| r.last3())),
            stats::mean_spread_text(&values(|r| r.top5())),
        );
    }
    if comparisons.is_empty() {
        return md;
    }
    md += "\nDifferences in evaluation top-1 (a − b, percentage points): mean [95 % interval], p-value of no difference, and the verdict on \"a > b\" at the 5 % level; with seeds in common, the seeds a 1-point gap in the last-three-epoch mean would need at the spread seen (80 % power).\n\n";
    md += "| a | b | test | last epoch | p | verdict | last 3 epochs | p | verdict | seeds for 1 point |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for c in comparisons {
        let cell = |e: &Value| {
            let d = e["difference"].as_f64().unwrap_or(f64::NAN);
            let interval = match (e["low"].as_f64(), e["high"].as_f64()) {
                (Some(lo), Some(hi)) => format!(" [{lo:+.2}, {hi:+.2}]"),
                _ => String::new(),
            };
            let p = e["p"].as_f64().map_or("—".to_string(), |p| format!("{p:.3}"));
            format!("{d:+.2}{interval} | {p} | {}", e["verdict"].as_str().unwrap_or(""))
        };
        md += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            c["a"].as_str().unwrap_or(""),
            c["b"].as_str().unwrap_or(""),
            c["method"].as_str().unwrap_or(""),
            cell(&c["top1"]),
            cell(&c["top1_last3"]),
            c["seeds_for_1_point"].as_u64().map_or("—".to_string(), |n| n.to_string()),
        );
    }
    md
}
