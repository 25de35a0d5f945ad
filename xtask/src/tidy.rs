//! Tidy checks: every Rust source file of the workspace opens with a `//!` doc comment, so
//! each crate and module says what it is for.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Lists the files lacking a leading `//!` comment; an error when there are any.
pub fn check(root: &Path) -> Result<()> {
    let mut files = Vec::new();
    for dir in ["crates", "xtask", "tests"] {
        rust_files(&root.join(dir), &mut files);
    }
    let missing: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .map(|f| f.strip_prefix(root).unwrap_or(f).display().to_string())
        .collect();
    if !missing.is_empty() {
        bail!("files without a `//!` doc comment:\n  {}", missing.join("\n  "))
    }
    eprintln!("tidy: {} Rust files, all documented", files.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_rust_file_has_a_module_doc() {
        super::check(&crate::project_root()).unwrap();
    }

    #[test]
    fn an_undocumented_file_is_reported() {
        let dir = tempfile::Builder::new().prefix("sae-tidy-").tempdir().unwrap();
        let dir = dir.path();
        std::fs::create_dir_all(dir.join("crates/x/src")).unwrap();
        std::fs::write(dir.join("crates/x/src/lib.rs"), "//! documented\n").unwrap();
        std::fs::write(dir.join("crates/x/src/bare.rs"), "fn f() {}\n").unwrap();
        let err = super::check(dir).unwrap_err().to_string();
        assert!(err.contains("bare.rs") && !err.contains("lib.rs"), "{err}");
    }
}
