//! Datasets (CIFAR-10, CIFAR-100, any image-classification dataset) and model weights from the
//! Hugging Face Hub, for users with the internet.
//!
//! The Hub's dataset repositories hold each split as parquet shards: an image column (a struct
//! of PNG `bytes` and a `path`) and integer label columns; the class names are in the
//! repository's `README.md` (`class_label` `names`). [`prepare_cifar`] downloads what is
//! missing through `hf-hub` into the standard Hub cache (`HF_HOME`, default
//! `~/.cache/huggingface`; `HF_ENDPOINT` picks the server; `HF_HUB_OFFLINE=1` uses the cache
//! only), checks each file's SHA-256 against the content hash the Hub served it under, decodes
//! and checks every image and label, and writes the split in the official binary layout
//! beside the cache (`HF_HOME/sae-datasets/…`), so that [`crate::Cifar::load`] reads it like a
//! download from the CIFAR homepage. Conversion happens once: a finished directory is reused.
//! Any image-classification dataset becomes an ImageNet-style folder ([`prepare_image_folder`]),
//! and model repositories' weight files come through the same cache ([`resolve_weights`]).

use crate::cifar::{CifarKind, Split, IMAGE_BYTES};
use crate::error::{io, Error, Result};
use hf_hub::{Cache, Repo, RepoType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Where a dataset lives on the Hub and how its parquet files are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSource {
    /// Dataset repository, `owner/name`.
    pub repo: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// Parquet shards of the training split, in order.
    pub train_files: Vec<String>,
    /// Parquet shards of the test split, in order.
    pub test_files: Vec<String>,
    /// The image column: a struct with a `bytes` field holding an encoded image.
    pub image_column: String,
    /// The label column of each label set: (column, number of classes).
    pub label_columns: Vec<(String, usize)>,
}

impl HubSource {
    /// `uoft-cs/cifar10`: `plain_text/{train,test}-00000-of-00001.parquet`, columns `img`, `label`.
    pub fn cifar10() -> Self {
        Self {
            repo: "uoft-cs/cifar10".into(),
            revision: "main".into(),
            train_files: vec!["plain_text/train-00000-of-00001.parquet".into()],
            test_files: vec!["plain_text/test-00000-of-00001.parquet".into()],
            image_column: "img".into(),
            label_columns: vec![("label".into(), 10)],
        }
    }

    /// `uoft-cs/cifar100`: `cifar100/{train,test}-00000-of-00001.parquet`, columns `img`,
    /// `fine_label`, `coarse_label`.
    pub fn cifar100() -> Self {
        Self {
            repo: "uoft-cs/cifar100".into(),
            revision: "main".into(),
            train_files: vec!["cifar100/train-00000-of-00001.parquet".into()],
            test_files: vec!["cifar100/test-00000-of-00001.parquet".into()],
            image_column: "img".into(),
            label_columns: vec![("fine_label".into(), 100), ("coarse_label".into(), 20)],
        }
    }

    /// The default source of a CIFAR kind.
    pub fn for_kind(kind: CifarKind) -> Self {
        match kind {
            CifarKind::Cifar10 => Self::cifar10(),
            CifarKind::Cifar100(_) => Self::cifar100(),
        }
    }

    fn repo_handle(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Dataset, self.revision.clone())
    }

    /// "owner/name@revision", for messages.
    fn label(&self) -> String {
        format!("{}@{}", self.repo, self.revision)
    }
}

fn hub_error(source: &HubSource, file: &str, reason: impl std::fmt::Display) -> Error {
    repo_error(&source.label(), file, reason)
}

/// An error about `file` of the repository `repo` ("owner/name@revision").
fn repo_error(repo: &str, file: &str, reason: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{repo} file {file}: {reason}"))
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "on"))
}

/// The Hub cache `hf-hub` uses: `HF_HOME/hub`, default `~/.cache/huggingface/hub`.
pub fn hub_cache() -> Cache {
    Cache::from_env()
}

/// Path of `file` of `source` in the local Hub cache, downloading it first unless it is cached;
/// with `HF_HUB_OFFLINE` set, only the cache is looked at. The file's SHA-256 is checked
/// against the content hash it was stored under.
pub fn fetch(source: &HubSource, file: &str) -> Result<PathBuf> {
    fetch_from(source.repo_handle(), &source.label(), file)
}

/// [`fetch`] of a model repository's file: pretrained weights (`timm/resnet50.a1_in1k`'s
/// `model.safetensors`), for `sae train --init hf:…` and `sae convert hf:…`.
pub fn fetch_model_file(repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
    let handle = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
    fetch_from(handle, &format!("{repo}@{revision}"), file)
}

/// The local path of weights named by `spec`: `spec` itself, or for `hf:OWNER/NAME[@REVISION]`
/// the Hub model repository's `model.safetensors` (timm's layout), or its `pytorch_model.bin`
/// where it has none, fetched into the Hub cache ([`fetch_model_file`]).
pub fn resolve_weights(spec: &Path) -> Result<PathBuf> {
    let Some(repo) = spec.to_str().and_then(|s| s.strip_prefix("hf:")) else { return Ok(spec.to_path_buf()) };
    let (repo, revision) = repo.split_once('@').unwrap_or((repo, "main"));
    if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
        return Err(Error::Invalid(format!("{}: expected hf:OWNER/NAME or hf:OWNER/NAME@REVISION", spec.display())));
    }
    fetch_model_file(repo, revision, "model.safetensors").or_else(|safetensors| {
        fetch_model_file(repo, revision, "pytorch_model.bin")
            .map_err(|bin| Error::Invalid(format!("no weights in hf:{repo}@{revision}: {safetensors}; {bin}")))
    })
}

/// [`fetch`] from the repository `handle`, named `label` in errors.
fn fetch_from(handle: Repo, label: &str, file: &str) -> Result<PathBuf> {
    let cached = hub_cache().repo(handle.clone()).get(file);
    let path = match cached {
        Some(p) => p,
        None if offline() => {
            return Err(repo_error(
                label,
                file,
                format!("HF_HUB_OFFLINE is set and the file is not in the cache at {}", hub_cache().path().display()),
            ))
        }
        None => {
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(false)
                .build()
                .map_err(|e| repo_error(label, file, e))?;
            api.repo(handle).download(file).map_err(|e| repo_error(label, file, e))?
        }
    };
    verify(label, file, &path)?;
    Ok(path)
}

/// Checks a cached file against the hash in its blob's name: the Hub serves large (LFS) files
/// under their SHA-256, and `hf-hub` stores them as `blobs/<that hash>`.
fn verify(label: &str, file: &str, path: &Path) -> Result<()> {
    let blob = std::fs::canonicalize(path).map_err(io(path))?;
    let expected = blob.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        // Small files are stored under a git object id, not a SHA-256 of their content.
        return Ok(());
    }
    let mut hasher = Sha256::new();
    let mut f = std::fs::File::open(&blob).map_err(io(&blob))?;
    std::io::copy(&mut f, &mut hasher).map_err(io(&blob))?;
    let actual: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if actual != expected {
        return Err(repo_error(
            label,
            file,
            format!(
                "{} has SHA-256 {actual}, but the Hub served it as {expected}: delete it and download again",
                blob.display()
            ),
        ));
    }
    Ok(())
}

/// Class names of `column` from a dataset card: the `'<i>': <name>` lines that follow
/// `- name: <column>` in its `dataset_info` features.
pub fn class_names_from_card(card: &str, column: &str, classes: usize) -> Option<Vec<String>> {
    let mut lines = card.lines().map(str::trim).skip_while(|l| *l != format!("- name: {column}"));
    lines.next()?;
    let mut names = Vec::new();
    for line in lines {
        if line.starts_with("- name:") {
            break;
        }
        let Some((index, name)) = line.split_once(':') else { continue };
        let index = index.trim().trim_matches(|c| c == '\'' || c == '"');
        if index.parse::<usize>().ok() == Some(names.len()) {
            names.push(name.trim().trim_matches(|c| c == '\'' || c == '"').to_string());
        }
    }
    (names.len() == classes).then_some(names)
}

/// Calls `f(i, row)` for every row of the parquet file at `path`; returns the row count its
/// metadata promises.
fn for_each_row(path: &Path, mut f: impl FnMut(usize, &Row) -> Result<()>) -> Result<usize> {
    let bad = |reason: String| Error::Format { path: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(io(path))?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(format!("not a readable parquet file: {e}")))?;
    let rows = reader.metadata().file_metadata().num_rows() as usize;
    let iter = reader.get_row_iter(None).map_err(|e| bad(format!("cannot read rows: {e}")))?;
    for (i, row) in iter.enumerate() {
        f(i, &row.map_err(|e| bad(format!("row {i}: {e}")))?)?;
    }
    Ok(rows)
}

/// The encoded bytes of an image column: the Hub's `Image` feature, a struct with `bytes`.
fn encoded_image(field: &Field) -> Option<Vec<u8>> {
    let Field::Group(g) = field else { return None };
    g.get_column_iter().find_map(|(n, f)| match (n.as_str(), f) {
        ("bytes", Field::Bytes(b)) => Some(b.data().to_vec()),
        _ => None,
    })
}

/// The value of an integer column.
fn integer(field: &Field) -> Option<i64> {
    match field {
        Field::Long(v) => Some(*v),
        Field::Int(v) => Some(*v as i64),
        Field::Short(v) => Some(*v as i64),
        Field::Byte(v) => Some(*v as i64),
        _ => None,
    }
}

/// Pixels (planar, [`IMAGE_BYTES`] per image) and every label column of one parquet shard.
fn read_shard(path: &Path, source: &HubSource) -> Result<(Vec<u8>, Vec<Vec<u8>>)> {
    let bad = |reason: String| Error::Format { path: path.to_path_buf(), reason };
    let mut pixels = Vec::new();
    let mut labels = vec![Vec::new(); source.label_columns.len()];
    let rows = for_each_row(path, |i, row| {
        let mut image = None;
        let mut found = vec![None; source.label_columns.len()];
        for (name, field) in row.get_column_iter() {
            if *name == source.image_column {
                image = encoded_image(field);
            } else if let Some(k) = source.label_columns.iter().position(|(c, _)| c == name) {
                found[k] = integer(field);
            }
        }
        let bytes = image.ok_or_else(|| bad(format!("row {i}: no image bytes in column {:?}", source.image_column)))?;
        let img = image::load_from_memory(&bytes).map_err(|e| bad(format!("row {i}: cannot decode image: {e}")))?;
        if (img.width(), img.height()) != (32, 32) {
            return Err(bad(format!("row {i}: image is {}×{}, expected 32×32", img.width(), img.height())));
        }
        let rgb = img.to_rgb8();
        for c in 0..3 {
            pixels.extend(rgb.pixels().map(|p| p.0[c]));
        }
        for (k, ((column, classes), value)) in source.label_columns.iter().zip(found).enumerate() {
            let value = value.ok_or_else(|| bad(format!("row {i}: no integer label in column {column:?}")))?;
            if !(0..*classes as i64).contains(&value) {
                return Err(bad(format!("row {i}: {column} {value} out of range 0..{classes}")));
            }
            labels[k].push(value as u8);
        }
        Ok(())
    })?;
    if labels.first().map_or(0, Vec::len) != rows {
        return Err(bad(format!("metadata promises {rows} rows, read {}", labels.first().map_or(0, Vec::len))));
    }
    Ok((pixels, labels))
}

/// Where a dataset converted from the Hub lives: `HF_HOME/sae-datasets/<name>`, complete once
/// it holds a `COMPLETE` marker.
fn converted_dir(name: &str) -> PathBuf {
    let root = hub_cache().path().parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    root.join("sae-datasets").join(name)
}

/// An empty temporary directory beside `dir` to convert into.
fn conversion_tmp(dir: &Path) -> Result<PathBuf> {
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    Ok(tmp)
}

/// Marks the conversion in `tmp` complete (the marker names its `origin`) and moves it to
/// `dir`, replacing an incomplete directory from an interrupted run.
fn finish_conversion(tmp: &Path, dir: &Path, origin: &str) -> Result<PathBuf> {
    let marker = tmp.join("COMPLETE");
    std::fs::write(&marker, format!("{origin}\n")).map_err(io(&marker))?;
    sae_fs::replace_dir(tmp, dir)?;
    Ok(dir.to_path_buf())
}

/// A CIFAR dataset in the official binary layout, converted from `source` on the Hub (see the
/// module docs). Returns the directory, for [`crate::Cifar::load`] with the same `kind`.
pub fn prepare_cifar(kind: CifarKind, source: &HubSource) -> Result<PathBuf> {
    let dir = converted_dir(&format!("{}@{}", source.repo.replace('/', "--"), source.revision));
    if dir.join("COMPLETE").exists() {
        return Ok(dir);
    }
    let expected_columns = match kind {
        CifarKind::Cifar10 => 1,
        CifarKind::Cifar100(_) => 2,
    };
    if source.label_columns.len() != expected_columns {
        return Err(Error::Invalid(format!(
            "{}: {kind:?} needs {expected_columns} label column(s), the source lists {:?}",
            source.repo, source.label_columns
        )));
    }
    let card_path = fetch(source, "README.md")?;
    let card = std::fs::read_to_string(&card_path).map_err(io(&card_path))?;
    let names: Vec<Vec<String>> = source
        .label_columns
        .iter()
        .map(|(column, classes)| {
            class_names_from_card(&card, column, *classes).ok_or_else(|| Error::Format {
                path: card_path.clone(),
                reason: format!("no {classes} class names for column {column:?} in the dataset card"),
            })
        })
        .collect::<Result<_>>()?;

    let tmp = conversion_tmp(&dir)?;
    for (split, files) in [(Split::Train, &source.train_files), (Split::Test, &source.test_files)] {
        let (mut pixels, mut labels) = (Vec::new(), vec![Vec::new(); source.label_columns.len()]);
        for file in files {
            let (p, l) = read_shard(&fetch(source, file)?, source)?;
            pixels.extend(p);
            for (all, part) in labels.iter_mut().zip(l) {
                all.extend(part);
            }
        }
        // CIFAR-10 records are (label, pixels); CIFAR-100's (coarse, fine, pixels), while the
        // source lists (fine, coarse).
        let record = |i: usize| -> Vec<u8> {
            let head = match kind {
                CifarKind::Cifar10 => vec![labels[0][i]],
                CifarKind::Cifar100(_) => vec![labels[1][i], labels[0][i]],
            };
            [&head[..], &pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]].concat()
        };
        // Split evenly over the official file names (CIFAR-10 has five training batches).
        let names = kind.files(split);
        let (images, files) = (labels[0].len(), names.len());
        for (b, name) in names.iter().enumerate() {
            let bytes: Vec<u8> = (b * images / files..(b + 1) * images / files).flat_map(record).collect();
            let path = tmp.join(name);
            std::fs::write(&path, bytes).map_err(io(&path))?;
        }
    }
    let write_names = |file: &str, names: &[String]| -> Result<()> {
        let path = tmp.join(file);
        std::fs::write(&path, names.join("\n") + "\n").map_err(io(&path))
    };
    match kind {
        CifarKind::Cifar10 => write_names("batches.meta.txt", &names[0])?,
        CifarKind::Cifar100(_) => {
            write_names("fine_label_names.txt", &names[0])?;
            write_names("coarse_label_names.txt", &names[1])?;
        }
    }
    finish_conversion(&tmp, &dir, &format!("{}@{}", source.repo, source.revision))
}

/// An image-classification dataset from the Hub as an ImageNet-style folder: its parquet
/// shards (an image column — a struct with the encoded `bytes` — and an integer `label`
/// column, as the Hub's `datasets` stores `Image` and `ClassLabel` features) are listed
/// through the Hub API, downloaded and verified like CIFAR's, and their images written once,
/// as they were encoded (JPEG or PNG, the formats the loader decodes), to
/// `HF_HOME/sae-datasets/<owner>--<name>@<revision>-folder/{train,val}/<k>-<class>/`. Shards
/// whose path mentions `train` are the training split; `validation`/`valid`/`val`, else
/// `test`, the evaluation split. Class names come from the dataset card's `class_label` names
/// for `label`, else `class<k>`; folder names are prefixed with the zero-padded label so that
/// their sorted order is the label order. Returns the folder, for [`crate::ImageFolder`].
pub fn prepare_image_folder(repo: &str, revision: &str) -> Result<PathBuf> {
    let dir = converted_dir(&format!("{}@{revision}-folder", repo.replace('/', "--")));
    if dir.join("COMPLETE").exists() {
        return Ok(dir);
    }
    let source = HubSource {
        repo: repo.to_string(),
        revision: revision.to_string(),
        train_files: Vec::new(),
        test_files: Vec::new(),
        image_column: String::new(),
        label_columns: Vec::new(),
    };
    if offline() {
        return Err(hub_error(&source, "(listing)", "HF_HUB_OFFLINE is set and the dataset was never converted here"));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| hub_error(&source, "(listing)", e))?;
    let info = api.repo(source.repo_handle()).info().map_err(|e| hub_error(&source, "(listing)", e))?;
    let mut shards: Vec<String> =
        info.siblings.into_iter().map(|s| s.rfilename).filter(|f| f.ends_with(".parquet")).collect();
    shards.sort();
    let split_of = |file: &str, words: &[&str]| {
        file.to_ascii_lowercase().split(|c: char| !c.is_ascii_alphanumeric()).any(|part| words.contains(&part))
    };
    let train: Vec<&String> = shards.iter().filter(|f| split_of(f, &["train"])).collect();
    let mut val: Vec<&String> = shards.iter().filter(|f| split_of(f, &["validation", "valid", "val"])).collect();
    if val.is_empty() {
        val = shards.iter().filter(|f| split_of(f, &["test"])).collect();
    }
    if train.is_empty() || val.is_empty() {
        return Err(hub_error(
            &source,
            "(listing)",
            format!("needs train and validation/test parquet shards, found {shards:?}"),
        ));
    }
    let mut rows = Vec::new();
    for (split, files) in [("train", &train), ("val", &val)] {
        for file in files.iter() {
            for (image, label) in read_image_shard(&fetch(&source, file)?)? {
                rows.push((split, image, label));
            }
        }
    }
    let classes = rows.iter().map(|r| r.2 as usize + 1).max().unwrap_or(0);
    let names = fetch(&source, "README.md")
        .ok()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|card| class_names_from_card(&card, "label", classes))
        .unwrap_or_else(|| (0..classes).map(|k| format!("class{k}")).collect());
    let width = classes.to_string().len().max(3);
    let folder = |k: usize| {
        let safe: String = names[k].chars().map(|c| if c.is_alphanumeric() || c == '_' { c } else { '_' }).collect();
        format!("{k:0width$}-{safe}")
    };

    let tmp = conversion_tmp(&dir)?;
    for (i, (split, bytes, label)) in rows.into_iter().enumerate() {
        let class_dir = tmp.join(split).join(folder(label as usize));
        std::fs::create_dir_all(&class_dir).map_err(io(&class_dir))?;
        let ext = match bytes.as_slice() {
            [0xff, 0xd8, 0xff, ..] => "jpg",
            [0x89, b'P', b'N', b'G', ..] => "png",
            _ => return Err(hub_error(&source, split, format!("image {i}: neither JPEG nor PNG"))),
        };
        let path = class_dir.join(format!("{i:08}.{ext}"));
        std::fs::write(&path, bytes).map_err(io(&path))?;
    }
    finish_conversion(&tmp, &dir, &format!("{repo}@{revision}"))
}

/// (encoded image, label) of every row of an image-classification parquet shard: the first
/// struct column with a `bytes` field, and the `label` column.
fn read_image_shard(path: &Path) -> Result<Vec<(Vec<u8>, u32)>> {
    let bad = |reason: String| Error::Format { path: path.to_path_buf(), reason };
    let mut out = Vec::new();
    for_each_row(path, |i, row| {
        let (mut image, mut label) = (None, None);
        for (name, field) in row.get_column_iter() {
            if name == "label" {
                label = integer(field);
            } else if image.is_none() {
                image = encoded_image(field);
            }
        }
        let image = image.ok_or_else(|| bad(format!("row {i}: no image column (a struct with `bytes`)")))?;
        let label = label.ok_or_else(|| bad(format!("row {i}: no integer `label` column")))?;
        let label = u32::try_from(label)
            .ok()
            .filter(|&l| l < 100_000)
            .ok_or_else(|| bad(format!("row {i}: label {label} out of range")))?;
        out.push((image, label));
        Ok(())
    })?;
    Ok(out)
}
