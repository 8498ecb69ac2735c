//! Journaling and replay on the registry: the same names, sources and versions come
//! back, lazily; unloads of start-up adapters stay in force; new versions number past
//! the replayed ones; a source the current policy refuses is left out.
use super::*;
use crate::lora::peft::LoraSite;
use crate::lora::synth::{write_synthetic_adapter, SynthSpec};
use std::io::Write;

fn base() -> BaseShape {
    crate::testing::tiny_config(97).base_shape()
}

/// A synthetic rank-4 adapter at `root/name`; its path.
fn adapter(root: &Path, name: &str, seed: u64) -> String {
    let p = root.join(name);
    let spec = SynthSpec {
        kind: Default::default(),
        rank: 4,
        alpha: 8.0,
        sites: vec![LoraSite::Q, LoraSite::V],
        seed,
    };
    write_synthetic_adapter(&p, &base(), &spec).unwrap();
    p.canonicalize().unwrap().to_string_lossy().into_owned()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    folders: PathBuf,
    runtime: PathBuf,
    state: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let folders = tmp.path().join("folders");
    let runtime = tmp.path().join("runtime");
    for (i, n) in ["f1", "f2"].iter().enumerate() {
        adapter(&folders, n, i as u64);
    }
    for (i, n) in ["x1", "x2", "x3"].iter().enumerate() {
        adapter(&runtime, n, 10 + i as u64);
    }
    let state = tmp.path().join("state");
    Fixture {
        _tmp: tmp,
        folders,
        runtime,
        state,
    }
}

/// A registry confined to `roots` with the start-up folder adapters f1 and f2
/// registered, as `serve --adapter-dir` does; the journal not yet open.
fn started(f: &Fixture, roots: &[PathBuf]) -> AdapterRegistry {
    let reg = AdapterRegistry::new(RegistryConfig {
        sources: SourcePolicy::confined(roots, false).unwrap(),
        ..RegistryConfig::new(base())
    });
    for n in ["f1", "f2"] {
        reg.register(n, &f.folders.join(n).to_string_lossy())
            .unwrap();
    }
    reg
}

fn snapshot(reg: &AdapterRegistry) -> Vec<(String, String, u64)> {
    reg.list()
        .into_iter()
        .map(|i| (i.name, i.source, i.version))
        .collect()
}

#[tokio::test]
async fn loads_replacements_and_unloads_come_back_after_a_restart() {
    let f = fixture();
    let roots = [f.folders.clone(), f.runtime.clone()];
    let reg = started(&f, &roots);
    assert_eq!(
        reg.open_journal(&f.state).unwrap(),
        ReplaySummary::default()
    );
    reg.load("a", "x1", None).await.unwrap();
    reg.load("b", "x2", Some(0)).await.unwrap();
    let a2 = reg.load("a", "x3", None).await.unwrap().version;
    let a3 = reg.reload("a", "x3").await.unwrap().version;
    assert!(a3 > a2);
    // A start-up folder adapter replaced, another used (not journaled), then unloaded.
    reg.load("f1", "x2", None).await.unwrap();
    drop(reg.acquire("f2").await.unwrap());
    let journal = f.state.join(JOURNAL_FILE);
    assert!(!std::fs::read_to_string(&journal).unwrap().contains("f2"));
    reg.unload("b").unwrap();
    reg.unload("f2").unwrap();
    let before = snapshot(&reg);
    let names: Vec<&str> = before.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "f1"]);
    let max_before = before.iter().map(|(_, _, v)| *v).max().unwrap();
    drop(reg);

    // A crash mid-append leaves a torn line.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&journal)
        .unwrap();
    file.write_all(b"{\"op\":\"load\",\"name\":\"zz\",\"sou")
        .unwrap();
    drop(file);

    let reg = started(&f, &roots);
    let summary = reg.open_journal(&f.state).unwrap();
    assert_eq!(
        summary,
        ReplaySummary {
            restored: 2,
            unloaded: 1,
            refused: 0,
            skipped_lines: 1,
        }
    );
    assert_eq!(snapshot(&reg), before);
    assert!(reg
        .list()
        .iter()
        .all(|i| i.state == AdapterState::Registered));
    // Loaded on first use, at the journaled version.
    let lease = reg.acquire("a").await.unwrap();
    assert_eq!(lease.version().version, a3);
    assert_eq!(reg.get("a").unwrap().state, AdapterState::Host);
    drop(lease);
    assert!(matches!(
        reg.acquire("f2").await,
        Err(RequestError::NotFound(_))
    ));
    // New versions number past the replayed ones, and compare-and-set sees them.
    let c = reg.load("c", "x1", None).await.unwrap().version;
    assert!(c > max_before, "{c} <= {max_before}");
    let f1 = reg.get("f1").unwrap().version;
    let f1_new = reg.load("f1", "x3", Some(f1)).await.unwrap().version;
    assert!(f1_new > c);
}

#[tokio::test]
async fn replay_leaves_out_sources_the_current_policy_refuses() {
    let f = fixture();
    let wide = [f.folders.clone(), f.runtime.clone()];
    let reg = started(&f, &wide);
    reg.open_journal(&f.state).unwrap();
    reg.load("a", "x1", None).await.unwrap();
    reg.load("f1", "x2", None).await.unwrap();
    drop(reg);
    // The runtime root is no longer an adapter root.
    let reg = started(&f, std::slice::from_ref(&f.folders));
    let summary = reg.open_journal(&f.state).unwrap();
    assert_eq!((summary.restored, summary.refused), (0, 2));
    assert!(reg.get("a").is_none());
    let f1 = reg.get("f1").unwrap();
    assert_eq!(f1.source, f.folders.join("f1").to_string_lossy());
    assert_eq!(f1.version, 0);
    // The next load still works, and a journal opens once.
    reg.load("d", "f2", None).await.unwrap();
    assert!(reg.open_journal(&f.state).is_err());
}

#[tokio::test]
async fn without_a_journal_nothing_is_written() {
    let f = fixture();
    let reg = started(&f, &[f.folders.clone(), f.runtime.clone()]);
    reg.load("a", "x1", None).await.unwrap();
    reg.unload("a").unwrap();
    assert!(!f.state.exists());
}

#[tokio::test]
async fn a_load_whose_caller_has_gone_is_still_journaled() {
    use futures::FutureExt;
    let f = fixture();
    let reg = started(&f, &[f.folders.clone(), f.runtime.clone()]);
    reg.open_journal(&f.state).unwrap();
    let source = f.folders.join("f1").to_string_lossy().into_owned();
    // The admin call starts the load (this runtime runs the load task only when the
    // test yields), a request joins it, and the admin caller goes away.
    let mut admin = Box::pin(reg.load("f1", &source, None));
    assert!((&mut admin).now_or_never().is_none());
    let mut request = Box::pin(reg.acquire("f1"));
    assert!((&mut request).now_or_never().is_none());
    drop(admin);
    let lease = request.await.unwrap();
    let version = lease.version().version;
    drop(lease);
    drop(reg);
    let reg = started(&f, &[f.folders.clone(), f.runtime.clone()]);
    reg.open_journal(&f.state).unwrap();
    assert_eq!(reg.get("f1").unwrap().version, version);
}
