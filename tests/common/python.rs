//! The test virtual environment's Python (`make python`; `MULTILORA_PYTHON` overrides),
//! and running one of the repository's Python scripts with it.
use super::repo_path;
use std::ffi::OsStr;
use std::path::PathBuf;

pub fn venv_python() -> PathBuf {
    let py = match std::env::var_os("MULTILORA_PYTHON") {
        Some(p) => p.into(),
        None => repo_path(".venv/bin/python"),
    };
    assert!(
        py.exists(),
        "{} is missing: run `make python`",
        py.display()
    );
    py
}

/// Runs `script` (a path under the repository) with `args`; its stdout, after asserting
/// that it succeeded (showing both streams if not).
pub async fn run_python<I, S>(script: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = tokio::process::Command::new(venv_python())
        .arg(repo_path(script))
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    stdout
}
