//! Where a run reports its progress: a progress bar on a terminal, plain log lines otherwise.

use crate::summary::EpochSummary;

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

/// The one-line summary of an epoch, as printed and as written to `train.log`.
pub fn epoch_line(s: &EpochSummary) -> String {
    format!(
        "epoch {:>3}: train loss {:.4} top-1 {:.2}% | eval loss {:.4} top-1 {:.2}% top-5 {:.2}% | lr {:.3e} | {:.1}s, {:.1} img/s",
        s.epoch, s.train_loss, s.train_top1, s.eval_loss, s.eval_top1, s.eval_top5, s.lr, s.seconds, s.images_per_second
    )
}
