//! A safetensors file read one tensor at a time: what it holds (names, dtypes, shapes) from its
//! header, then each tensor's bytes when asked. Reading a whole file first holds all of it
//! twice beside whatever it is loaded into (the bytes, then the tensors made from them):
//! loading a model's weights peaked at three times their size, and resuming a training run
//! held the optimiser's two moments twice over. The header is checked against the file's
//! length when it is opened, so a truncated or padded file fails before anything is read.

use crate::{Error, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, TensorView};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// safetensors' own limit on a header, in bytes.
const MAX_HEADER: u64 = 100_000_000;

/// An open safetensors file (see the module doc).
pub struct TensorFile {
    file: File,
    path: PathBuf,
    /// Where the data after the header begins.
    data_start: u64,
    metadata: Metadata,
}

impl TensorFile {
    /// Opens `path` and reads and checks its header.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Safetensors { path: path.to_path_buf(), reason };
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut header_len = [0u8; 8];
        file.read_exact(&mut header_len).map_err(|_| bad(format!("{len} bytes, too short for a header")))?;
        let header_len = u64::from_le_bytes(header_len);
        if header_len > (len - 8).min(MAX_HEADER) {
            return Err(bad(format!("a header of {header_len} bytes in a file of {len}")));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        // Deserialising checks that the tensors' byte ranges follow one another and fit their
        // shapes and dtypes.
        let metadata: Metadata = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = metadata.tensors().values().map(|info| info.data_offsets.1 as u64).max().unwrap_or(0);
        if data_start + data_len != len {
            return Err(bad(format!(
                "its header describes {data_len} bytes of tensors, the file holds {}",
                len - data_start
            )));
        }
        Ok(Self { file, path: path.to_path_buf(), data_start, metadata })
    }

    /// Every tensor's name, dtype and shape, as the header gives them (an error for a dtype
    /// Candle does not have).
    pub fn shapes(&self) -> Result<Vec<(String, DType, Vec<usize>)>> {
        let mut shapes = Vec::new();
        for (name, info) in self.metadata.tensors() {
            let dtype = DType::try_from(info.dtype)
                .map_err(|e| Error::Safetensors { path: self.path.clone(), reason: format!("{name}: {e}") })?;
            shapes.push((name, dtype, info.shape.clone()));
        }
        shapes.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(shapes)
    }

    /// The tensor `name` on `device`, or `None` where the file has none of that name.
    pub fn read(&mut self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some(info) = self.metadata.info(name) else { return Ok(None) };
        let (start, end) = info.data_offsets;
        let io = |source| Error::Io { path: self.path.clone(), source };
        let mut data = vec![0u8; end - start];
        self.file.seek(SeekFrom::Start(self.data_start + start as u64)).map_err(io)?;
        self.file.read_exact(&mut data).map_err(io)?;
        let bad =
            |e: &dyn std::fmt::Display| Error::Safetensors { path: self.path.clone(), reason: format!("{name}: {e}") };
        let view = TensorView::new(info.dtype, info.shape.clone(), &data).map_err(|e| bad(&e))?;
        view.load(device).map(Some).map_err(|e| bad(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn tmp_file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    /// Every tensor read alone equals what Candle's whole-file loader reads, in f32, bf16 and
    /// i64, whatever the order of the requests; an absent name is `None`; the shapes are the
    /// header's.
    #[test]
    fn tensors_read_one_at_a_time_equal_the_whole_file() {
        let device = Device::Cpu;
        let values = |n: usize| Tensor::arange(0f32, n as f32, &device).unwrap().affine(0.37, -1.5).unwrap();
        let tensors: HashMap<String, Tensor> = [
            ("a.m".to_string(), values(60).reshape((5, 3, 4)).unwrap()),
            ("b".to_string(), values(7).to_dtype(DType::BF16).unwrap()),
            ("step".to_string(), Tensor::new(&[42i64], &device).unwrap()),
        ]
        .into();
        let (_dir, path) = tmp_file("state.safetensors", &[]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let whole = candle_core::safetensors::load(&path, &device).unwrap();
        let mut file = TensorFile::open(&path).unwrap();
        assert_eq!(
            file.shapes().unwrap(),
            [
                ("a.m".to_string(), DType::F32, vec![5, 3, 4]),
                ("b".to_string(), DType::BF16, vec![7]),
                ("step".to_string(), DType::I64, vec![1])
            ]
        );
        for name in ["step", "b", "a.m", "b"] {
            let got = file.read(name, &device).unwrap().unwrap();
            let want = &whole[name];
            assert_eq!((got.dtype(), got.dims()), (want.dtype(), want.dims()), "{name}");
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(bits(&got), bits(want), "{name}");
        }
        assert!(file.read("a.v", &device).unwrap().is_none());
    }

    /// Damaged files fail when opened, naming the file and what is wrong.
    #[test]
    fn damaged_files_are_named() {
        let device = Device::Cpu;
        let tensors: HashMap<String, Tensor> =
            [("w".to_string(), Tensor::ones((4, 4), DType::F32, &device).unwrap())].into();
        let (_dir, path) = tmp_file("good.safetensors", &[]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len + 8 + 64, good.len());
        let mut bad_json = good.clone();
        bad_json[8] = b'x';
        let mut huge_header = good.clone();
        huge_header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let cases: [(&str, Vec<u8>, &str); 5] = [
            ("short", good[..5].to_vec(), "too short for a header"),
            ("truncated", good[..good.len() - 1].to_vec(), "64 bytes of tensors, the file holds 63"),
            ("longer", [good.as_slice(), &[0u8; 3]].concat(), "the file holds 67"),
            ("bad-json", bad_json, "header:"),
            ("huge-header", huge_header, "a header of 18446744073709551615 bytes"),
        ];
        for (name, bytes, what) in cases {
            let (_dir, path) = tmp_file(&format!("{name}.safetensors"), &bytes);
            let err = TensorFile::open(&path).err().unwrap_or_else(|| panic!("{name} opened")).to_string();
            assert!(
                err.contains(&format!("{name}.safetensors"))
                    && err.contains("not a valid safetensors file")
                    && err.contains(what),
                "{name}: {err}"
            );
        }
    }
}
