//! Helpers shared by the `sae` binary's test files: scratch directories and generated data.

use std::path::Path;

/// An empty directory for one test, removed when the returned guard drops (a failing test too).
pub fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("sae-cli-{name}-")).tempdir().unwrap()
}

/// A path as the `&str` the binary's arguments need.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// CIFAR-10 binary batches of coloured noise, `2·per_class` training images per file and 20
/// test images: the class sets the colour (learnable).
pub fn write_cifar10(dir: &Path, per_class: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let record = |label: usize, i: usize| -> Vec<u8> {
        let base = [label * 25, 255 - label * 25, (label * 70) % 256];
        let mut r = vec![label as u8];
        for (c, b) in base.iter().enumerate() {
            r.extend((0..1024).map(|p| (*b as i32 + ((p * 7 + i * 13 + c) % 31) as i32 - 15).clamp(0, 255) as u8));
        }
        r
    };
    for (f, name) in
        ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"]
            .iter()
            .enumerate()
    {
        let bytes: Vec<u8> = (0..per_class * 2).flat_map(|i| record((i + f) % 10, i + 100 * f)).collect();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), (0..20).flat_map(|i| record(i % 10, i)).collect::<Vec<u8>>()).unwrap();
    std::fs::write(dir.join("batches.meta.txt"), (0..10).map(|k| format!("colour{k}\n")).collect::<String>()).unwrap();
}
