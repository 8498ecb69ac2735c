//! A PEFT adapter folder on disk: the one place its file names are written, and the
//! listing of the adapter folders inside a directory (`--adapter-dir`, churn sources).
use std::path::{Path, PathBuf};

/// The adapter's configuration.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights (the only weights format we read).
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's pickled weights, which are never opened.
pub const PICKLE_WEIGHTS_FILE: &str = "adapter_model.bin";
/// The files that make an adapter folder, for copying one.
pub const FILES: [&str; 2] = [CONFIG_FILE, WEIGHTS_FILE];

/// Whether `path` is a folder holding an adapter configuration.
pub fn is_adapter_folder(path: &Path) -> bool {
    path.join(CONFIG_FILE).is_file()
}

/// The adapter folders directly inside `dir`, sorted by path.
pub fn list_adapter_folders(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if is_adapter_folder(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_only_adapter_folders_sorted() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["b", "a", "not-an-adapter"] {
            std::fs::create_dir(dir.path().join(n)).unwrap();
        }
        for n in ["a", "b"] {
            std::fs::write(dir.path().join(n).join(CONFIG_FILE), "{}").unwrap();
        }
        std::fs::write(dir.path().join("loose-file"), "").unwrap();
        let found = list_adapter_folders(dir.path()).unwrap();
        assert_eq!(found, vec![dir.path().join("a"), dir.path().join("b")]);
        assert!(list_adapter_folders(&dir.path().join("missing")).is_err());
    }
}
