//! TensorBoard event files: a run's scalars in `events.out.tfevents.*`, so that
//! `tensorboard --logdir runs/` shows runs made here beside PyTorch's: each optimiser step's
//! training loss, top-1 and learning rate under `step/…` (at the step's number, counted from 1
//! over the whole run), and each epoch's summary (at the epoch's number).
//!
//! The format is TensorFlow's record file of `Event` protocol buffers, written by hand (a few
//! fields of `event.proto` and `summary.proto`, proto3 encoding): each record is its length
//! (u64, little-endian), the masked CRC-32C of those 8 bytes, the event, and the masked CRC-32C
//! of the event. The first event names the file version, the second is a `SessionLog` START at
//! the first step this opening logs; the later ones hold scalars under their tags.
//!
//! Every opening of a run (a resume) writes a new file beside the old ones, which TensorBoard
//! reads in order. A run killed after its last checkpoint has logged steps that its resume
//! trains and logs again: the START tells TensorBoard to drop what earlier files logged at or
//! after that step (as `SummaryWriter(purge_step=…)` does in PyTorch), so that each step shows
//! once. Epochs are logged after their checkpoint, so none is logged twice.

use crate::error::io;
use crate::summary::EpochSummary;
use crate::Result;
use sae_models::protobuf::{field_bytes, field_f32, field_f64, field_varint};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// An open event file of a run directory.
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<seconds>.<host>.sae` (a name of its own for every
    /// opening: a resume does not append to a file TensorBoard may be reading) and writes the
    /// file-version event and a START at `first_step`, the first step this opening logs.
    pub fn create(dir: &Path, first_step: u64) -> Result<Self> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let host = if host.is_empty() { "localhost".to_string() } else { host };
        let mut name = format!("events.out.tfevents.{}.{host}.sae", now.as_secs());
        // Two openings within a second (a resume right after a stop) get two files.
        let mut n = 1;
        while dir.join(&name).exists() {
            n += 1;
            name = format!("events.out.tfevents.{}.{host}.sae.{n}", now.as_secs());
        }
        let path = dir.join(name);
        let file = File::create(&path).map_err(io(&path))?;
        let mut writer = Self { path, file };
        let mut event = event_header(now.as_secs_f64(), 0);
        field_bytes(&mut event, 3, b"brain.Event:2");
        writer.write_record(&event)?;
        let mut start = event_header(now.as_secs_f64(), first_step);
        // `session_log` (field 7): a `SessionLog` whose `status` (field 1) is START (1).
        let mut log = Vec::new();
        field_varint(&mut log, 1, 1);
        field_bytes(&mut start, 7, &log);
        writer.write_record(&start)?;
        Ok(writer)
    }

    /// Writes `summary`'s scalars at its epoch (the step TensorBoard plots them at).
    pub fn epoch(&mut self, summary: &EpochSummary) -> Result<()> {
        self.scalars(
            summary.epoch as u64,
            &[
                ("train/loss", summary.train_loss),
                ("train/top1", summary.train_top1),
                ("eval/loss", summary.eval_loss),
                ("eval/top1", summary.eval_top1),
                ("eval/top5", summary.eval_top5),
                ("lr", summary.lr),
                ("images_per_second", summary.images_per_second),
            ],
        )
    }

    /// Writes an optimiser step's scalars: its training loss and top-1 (over the step's
    /// batches, on all processes) and learning rate, at the step's number.
    pub fn step(&mut self, step: u64, loss: f64, top1: f64, lr: f64) -> Result<()> {
        self.scalars(step, &[("step/train_loss", loss), ("step/train_top1", top1), ("step/lr", lr)])
    }

    fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.write_record(&scalar_event(now.as_secs_f64(), step, scalars))
    }

    /// One record: length, its masked CRC, the data, its masked CRC; flushed, so that a
    /// killed run leaves whole records.
    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        record.extend_from_slice(data);
        record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file.write_all(&record).and_then(|()| self.file.flush()).map_err(io(&self.path))
    }
}

/// An `Event` with its wall time (field 1, double) and step (field 2, int64).
fn event_header(wall_time: f64, step: u64) -> Vec<u8> {
    let mut event = Vec::new();
    field_f64(&mut event, 1, wall_time);
    field_varint(&mut event, 2, step);
    event
}

/// An `Event` at `step` whose `Summary` (field 5) holds one `Value` per scalar: its tag (field
/// 1) and `simple_value` (field 2, float).
fn scalar_event(wall_time: f64, step: u64, scalars: &[(&str, f64)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, value) in scalars {
        let mut v = Vec::new();
        field_bytes(&mut v, 1, tag.as_bytes());
        field_f32(&mut v, 2, *value as f32);
        field_bytes(&mut summary, 1, &v);
    }
    let mut event = event_header(wall_time, step);
    field_bytes(&mut event, 5, &summary);
    event
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: records are small.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// TensorFlow's masked CRC: rotated right by 15 bits plus a constant.
fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check value of CRC-32C (RFC 3720 and every CRC catalogue): "123456789" → 0xE3069283;
    /// and 32 zero bytes → 0x8A9136AA (RFC 3720, B.4).
    #[test]
    fn crc32c_has_its_check_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }
}
