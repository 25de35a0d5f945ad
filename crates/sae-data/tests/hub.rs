//! The Hub download path against a local HTTP server that this test starts: it serves tiny
//! CIFAR datasets written here as parquet shards (PNG bytes + labels) and a dataset card, with
//! the headers the Hub sends (`ETag` = SHA-256, `X-Repo-Commit`, ranges). Checks: the converted
//! files hold exactly the images and labels written, the cache is reused without requests,
//! `HF_HUB_OFFLINE` works from the cache and fails clearly without it, a file that does not
//! match its hash and a label out of range are errors naming them.
//!
//! Environment variables are process-wide, so everything runs in one test.

use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use sae_data::{prepare_cifar, Cifar, CifarKind, Dataset, HubSource, LabelSet, Split};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A 32×32 image whose pixels encode (image, channel, pixel).
fn image(i: usize) -> image::RgbImage {
    image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(i * 7 + x as usize) as u8, (i * 3 + y as usize) as u8, (i * 11) as u8])
    })
}

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A parquet shard in the Hub's layout: `img` {bytes, path (null)} and integer label columns.
fn shard(images: &[usize], labels: &[(&str, Vec<i64>)]) -> Vec<u8> {
    shard_of(images.iter().map(|&i| png(&image(i))).collect(), labels)
}

/// The same with the encoded images given.
fn shard_of(encoded: Vec<Vec<u8>>, labels: &[(&str, Vec<i64>)]) -> Vec<u8> {
    let images: Vec<usize> = (0..encoded.len()).collect();
    let label_fields: String = labels.iter().map(|(name, _)| format!("OPTIONAL INT64 {name};")).collect();
    let schema = format!(
        "message schema {{ OPTIONAL GROUP img {{ OPTIONAL BYTE_ARRAY bytes; OPTIONAL BYTE_ARRAY path (UTF8); }} {label_fields} }}"
    );
    let schema = Arc::new(parquet::schema::parser::parse_message_type(&schema).unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
    let mut out = Vec::new();
    let mut writer = SerializedFileWriter::new(&mut out, schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let bytes: Vec<ByteArray> = encoded.into_iter().map(ByteArray::from).collect();
    let mut column = 0;
    while let Some(mut col) = group.next_column().unwrap() {
        match column {
            0 => col.typed::<ByteArrayType>().write_batch(&bytes, Some(&vec![2; images.len()]), None).unwrap(),
            // `path` is null: the group is there (level 1), the value is not.
            1 => col.typed::<ByteArrayType>().write_batch(&[], Some(&vec![1; images.len()]), None).unwrap(),
            k => col.typed::<Int64Type>().write_batch(&labels[k - 2].1, Some(&vec![1; images.len()]), None).unwrap(),
        };
        col.close().unwrap();
        column += 1;
    }
    group.close().unwrap();
    writer.close().unwrap();
    out
}

fn card(columns: &[(&str, usize)]) -> String {
    let mut s = String::from("---\ndataset_info:\n  features:\n  - name: img\n    dtype: image\n");
    for (name, classes) in columns {
        s += &format!("  - name: {name}\n    dtype:\n      class_label:\n        names:\n");
        for k in 0..*classes {
            s += &format!("          '{k}': {name}_{k}\n");
        }
    }
    s + "---\n# Test dataset\n"
}

/// Files by URL path, and how many requests were served.
struct Hub {
    files: Mutex<HashMap<String, (Vec<u8>, String)>>,
    requests: AtomicUsize,
}

impl Hub {
    fn put(&self, repo: &str, file: &str, bytes: Vec<u8>) {
        let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        self.put_with_etag(repo, file, bytes, sha);
    }

    fn put_with_etag(&self, repo: &str, file: &str, bytes: Vec<u8>, etag: String) {
        self.files.lock().unwrap().insert(format!("/datasets/{repo}/resolve/main/{file}"), (bytes, etag));
    }

    /// A file of a model repository (served without the `/datasets` prefix).
    fn put_model(&self, repo: &str, file: &str, bytes: Vec<u8>) {
        let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        self.files.lock().unwrap().insert(format!("/{repo}/resolve/main/{file}"), (bytes, sha));
    }

    fn serve(self: Arc<Self>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap();
                let mut range = None;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        if k.eq_ignore_ascii_case("range") {
                            range = Some(v.trim().trim_start_matches("bytes=").to_string());
                        }
                    }
                }
                self.requests.fetch_add(1, Ordering::SeqCst);
                let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
                let files = self.files.lock().unwrap();
                // The repository listing of the Hub API: every file served under the repo.
                if let Some(repo) = path.strip_prefix("/api/datasets/").and_then(|r| r.strip_suffix("/revision/main")) {
                    let prefix = format!("/datasets/{repo}/resolve/main/");
                    let siblings: Vec<String> = files
                        .keys()
                        .filter_map(|k| k.strip_prefix(&prefix))
                        .map(|f| format!("{{\"rfilename\":\"{f}\"}}"))
                        .collect();
                    let body = format!(
                        "{{\"siblings\":[{}],\"sha\":\"0123456789abcdef0123456789abcdef01234567\"}}",
                        siblings.join(",")
                    );
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    stream.write_all(head.as_bytes()).unwrap();
                    stream.write_all(body.as_bytes()).unwrap();
                    continue;
                }
                let Some((bytes, etag)) = files.get(&path) else {
                    stream
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .unwrap();
                    continue;
                };
                let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
                    Some((a, b)) => (a.parse().unwrap_or(0), b.parse().unwrap_or(bytes.len() - 1)),
                    None => (0, bytes.len() - 1),
                };
                let body = &bytes[start..=end.min(bytes.len() - 1)];
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {}\r\nContent-Range: bytes {start}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    "0123456789abcdef0123456789abcdef01234567",
                    start + body.len() - 1,
                    bytes.len(),
                    body.len()
                );
                stream.write_all(head.as_bytes()).unwrap();
                stream.write_all(body).unwrap();
            }
        });
        url
    }
}

fn source(repo: &str, train: &[&str], test: &[&str], labels: &[(&str, usize)]) -> HubSource {
    HubSource {
        repo: repo.into(),
        revision: "main".into(),
        train_files: train.iter().map(|s| s.to_string()).collect(),
        test_files: test.iter().map(|s| s.to_string()).collect(),
        image_column: "img".into(),
        label_columns: labels.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
    }
}

/// Planar pixels of test image `i`, as the binary layout stores them.
fn planes(i: usize) -> Vec<u8> {
    let img = image(i);
    (0..3).flat_map(|c| img.pixels().map(move |p| p.0[c]).collect::<Vec<_>>()).collect()
}

#[test]
fn hub_download_converts_verifies_caches_and_works_offline() {
    let home = tempfile::Builder::new().prefix("sae-hub-").tempdir().unwrap();
    let home = home.path();
    let hub = Arc::new(Hub { files: Mutex::new(HashMap::new()), requests: AtomicUsize::new(0) });
    let url = hub.clone().serve();
    std::env::set_var("HF_HOME", home);
    std::env::set_var("HF_ENDPOINT", &url);
    std::env::remove_var("HF_HUB_OFFLINE");

    // CIFAR-100 layout in two training shards: fine = 5·i % 100, coarse = i % 20.
    let c100 = [("fine_label", 100), ("coarse_label", 20)];
    let labels = |ids: &[usize]| -> Vec<(&str, Vec<i64>)> {
        vec![
            ("fine_label", ids.iter().map(|&i| (5 * i % 100) as i64).collect()),
            ("coarse_label", ids.iter().map(|&i| (i % 20) as i64).collect()),
        ]
    };
    let repo = "test/cifar100-tiny";
    hub.put(repo, "README.md", card(&c100).into_bytes());
    hub.put(repo, "d/train-0.parquet", shard(&[0, 1, 2], &labels(&[0, 1, 2])));
    hub.put(repo, "d/train-1.parquet", shard(&[3, 4], &labels(&[3, 4])));
    hub.put(repo, "d/test-0.parquet", shard(&[5, 6], &labels(&[5, 6])));
    let src = source(repo, &["d/train-0.parquet", "d/train-1.parquet"], &["d/test-0.parquet"], &c100);

    // Offline with nothing cached: a clear error naming the file and the variable.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let err = prepare_cifar(CifarKind::Cifar100(LabelSet::Coarse), &src).unwrap_err().to_string();
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains("README.md") && err.contains(repo), "{err}");
    assert_eq!(hub.requests.load(Ordering::SeqCst), 0);
    std::env::remove_var("HF_HUB_OFFLINE");

    let dir = prepare_cifar(CifarKind::Cifar100(LabelSet::Coarse), &src).unwrap();
    assert!(dir.starts_with(home), "{} is not under HF_HOME", dir.display());
    let train = Cifar::load(&dir, CifarKind::Cifar100(LabelSet::Coarse), Split::Train).unwrap();
    assert_eq!(train.labels, [0, 1, 2, 3, 4]);
    assert_eq!(train.classes[3], "coarse_label_3");
    for i in 0..5 {
        assert_eq!(train.planes(i), planes(i).as_slice(), "image {i}");
    }
    let fine = Cifar::load(&dir, CifarKind::Cifar100(LabelSet::Fine), Split::Test).unwrap();
    assert_eq!(fine.labels, [25, 30]);
    assert_eq!(fine.classes[99], "fine_label_99");
    assert_eq!(fine.get(1).unwrap().0.data[0], image(6).get_pixel(0, 0).0[0]);
    assert!(home.join("hub/datasets--test--cifar100-tiny").is_dir(), "not in the standard Hub cache layout");

    // Done once: no more requests, same directory.
    let served = hub.requests.load(Ordering::SeqCst);
    assert_eq!(prepare_cifar(CifarKind::Cifar100(LabelSet::Fine), &src).unwrap(), dir);
    assert_eq!(hub.requests.load(Ordering::SeqCst), served);

    // Offline from the cache: the conversion is redone without a request.
    std::fs::remove_dir_all(&dir).unwrap();
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let again = prepare_cifar(CifarKind::Cifar100(LabelSet::Coarse), &src).unwrap();
    assert_eq!(Cifar::load(&again, CifarKind::Cifar100(LabelSet::Coarse), Split::Train).unwrap().labels, train.labels);
    assert_eq!(hub.requests.load(Ordering::SeqCst), served);
    std::env::remove_var("HF_HUB_OFFLINE");

    // CIFAR-10 layout: 7 training images over the five official batch files.
    let c10 = [("label", 10)];
    let repo10 = "test/cifar10-tiny";
    hub.put(repo10, "README.md", card(&c10).into_bytes());
    let l10 = |ids: &[usize]| vec![("label", ids.iter().map(|&i| (i % 10) as i64).collect::<Vec<_>>())];
    hub.put(repo10, "train.parquet", shard(&[0, 1, 2, 3, 4, 5, 6], &l10(&[0, 1, 2, 3, 4, 5, 6])));
    hub.put(repo10, "test.parquet", shard(&[7, 8], &l10(&[7, 8])));
    let src10 = source(repo10, &["train.parquet"], &["test.parquet"], &c10);
    let dir10 = prepare_cifar(CifarKind::Cifar10, &src10).unwrap();
    let train10 = Cifar::load(&dir10, CifarKind::Cifar10, Split::Train).unwrap();
    assert_eq!(train10.labels, [0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(train10.planes(6), planes(6).as_slice());
    assert_eq!(Cifar::load(&dir10, CifarKind::Cifar10, Split::Test).unwrap().labels, [7, 8]);

    // A file that does not match the hash it was served under.
    let repo_bad = "test/corrupt";
    hub.put(repo_bad, "README.md", card(&c10).into_bytes());
    hub.put_with_etag(repo_bad, "train.parquet", shard(&[0], &l10(&[0])), "ab".repeat(32));
    hub.put(repo_bad, "test.parquet", shard(&[1], &l10(&[1])));
    let err = prepare_cifar(CifarKind::Cifar10, &source(repo_bad, &["train.parquet"], &["test.parquet"], &c10));
    let err = err.unwrap_err().to_string();
    assert!(err.contains("train.parquet") && err.contains("SHA-256"), "{err}");

    // A label out of range names the shard, the row and the column.
    let repo_label = "test/bad-label";
    hub.put(repo_label, "README.md", card(&c10).into_bytes());
    hub.put(repo_label, "train.parquet", shard(&[0, 1], &[("label", vec![3, 12])]));
    hub.put(repo_label, "test.parquet", shard(&[1], &l10(&[1])));
    let err = prepare_cifar(CifarKind::Cifar10, &source(repo_label, &["train.parquet"], &["test.parquet"], &c10));
    let err = err.unwrap_err().to_string();
    assert!(err.contains("row 1: label 12 out of range 0..10"), "{err}");

    // An image-classification dataset (JPEG and PNG rows) becomes an ImageNet-style folder.
    let repo_img = "test/images";
    let encode = |i: usize, format: image::ImageFormat| {
        let mut out = std::io::Cursor::new(Vec::new());
        image(i).write_to(&mut out, format).unwrap();
        out.into_inner()
    };
    let label = |ids: &[i64]| vec![("label", ids.to_vec())];
    hub.put(repo_img, "README.md", card(&[("label", 3)]).into_bytes());
    let jpegs = (0..3).map(|i| encode(i, image::ImageFormat::Jpeg)).collect();
    hub.put(repo_img, "data/train-00000-of-00002.parquet", shard_of(jpegs, &label(&[0, 1, 2])));
    let pngs = (3..6).map(|i| encode(i, image::ImageFormat::Png)).collect();
    hub.put(repo_img, "data/train-00001-of-00002.parquet", shard_of(pngs, &label(&[2, 1, 0])));
    let val_pngs = (6..9).map(|i| encode(i, image::ImageFormat::Png)).collect();
    hub.put(repo_img, "data/validation-00000-of-00001.parquet", shard_of(val_pngs, &label(&[0, 1, 2])));
    let folder = sae_data::prepare_image_folder(repo_img, "main").unwrap();
    let train = sae_data::ImageFolder::open(&folder.join("train")).unwrap();
    assert_eq!(train.classes, ["000-label_0", "001-label_1", "002-label_2"]);
    let labels: Vec<u32> = train.samples.iter().map(|s| s.1).collect();
    assert_eq!(labels, [0, 0, 1, 1, 2, 2]);
    // PNG rows are written as they were: image 5 (label 0) has exact pixels.
    let (img5, label5) = train.get(1).unwrap();
    assert_eq!(
        (label5, &img5.data[..], train.samples[1].0.extension().unwrap()),
        (0, image(5).as_raw().as_slice(), std::ffi::OsStr::new("png"))
    );
    assert_eq!(train.samples[0].0.extension().unwrap(), "jpg");
    let val = sae_data::ImageFolder::open(&folder.join("val")).unwrap();
    assert_eq!(val.samples.len(), 3);
    assert_eq!(val.get(2).unwrap().0.data, image(8).into_raw());
    let served = hub.requests.load(Ordering::SeqCst);
    assert_eq!(sae_data::prepare_image_folder(repo_img, "main").unwrap(), folder);
    assert_eq!(hub.requests.load(Ordering::SeqCst), served, "converted once");
    // Without a validation or test split: refused, listing what is there.
    hub.put("test/train-only", "train.parquet", shard(&[0], &l10(&[0])));
    let err = sae_data::prepare_image_folder("test/train-only", "main").unwrap_err().to_string();
    assert!(err.contains("validation/test") && err.contains("train.parquet"), "{err}");
    // Rows that are not JPEG or PNG are refused, naming the row.
    hub.put("test/gif", "train.parquet", shard_of(vec![b"GIF89a....".to_vec()], &label(&[0])));
    hub.put("test/gif", "test.parquet", shard(&[1], &l10(&[0])));
    let err = sae_data::prepare_image_folder("test/gif", "main").unwrap_err().to_string();
    assert!(err.contains("test/gif") && err.contains("image 0: neither JPEG nor PNG"), "{err}");

    // A missing file on the server is an error naming it.
    let err = prepare_cifar(CifarKind::Cifar10, &source("test/absent", &["x.parquet"], &["y.parquet"], &c10));
    assert!(err.unwrap_err().to_string().contains("test/absent"));

    // A model repository's file (pretrained weights): downloaded into the Hub cache's model
    // layout, checked, then read from the cache, offline too.
    let weights = b"the bytes of a weights file".to_vec();
    hub.put_model("test/tiny-model", "model.safetensors", weights.clone());
    let path = sae_data::fetch_model_file("test/tiny-model", "main", "model.safetensors").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), weights);
    assert!(home.join("hub/models--test--tiny-model").is_dir(), "not in the Hub cache's model layout");
    let served = hub.requests.load(Ordering::SeqCst);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert_eq!(sae_data::fetch_model_file("test/tiny-model", "main", "model.safetensors").unwrap(), path);
    std::env::remove_var("HF_HUB_OFFLINE");
    assert_eq!(hub.requests.load(Ordering::SeqCst), served);
    let err = sae_data::fetch_model_file("test/tiny-model", "main", "pytorch_model.bin").unwrap_err().to_string();
    assert!(err.contains("test/tiny-model@main file pytorch_model.bin"), "{err}");
    // `hf:` weights specs: model.safetensors, else pytorch_model.bin; a local path stays itself.
    let spec = |s: &str| sae_data::resolve_weights(std::path::Path::new(s));
    assert_eq!(spec("hf:test/tiny-model").unwrap(), path);
    assert_eq!(spec("hf:test/tiny-model@main").unwrap(), path);
    hub.put_model("test/bin-only", "pytorch_model.bin", b"torch.save bytes".to_vec());
    assert!(spec("hf:test/bin-only").unwrap().ends_with("pytorch_model.bin"));
    let err = spec("hf:test/empty").unwrap_err().to_string();
    assert!(err.contains("no weights in hf:test/empty@main") && err.contains("pytorch_model.bin"), "{err}");
    let err = spec("hf:no-owner").unwrap_err().to_string();
    assert!(err.contains("expected hf:OWNER/NAME"), "{err}");
    assert_eq!(spec("runs/a/model.safetensors").unwrap(), std::path::PathBuf::from("runs/a/model.safetensors"));
}
