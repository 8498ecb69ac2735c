//! The Hub loading path ([`multilora::hub`]) against a local stand-in for the Hub's
//! file-resolve API (`hub_loading/hub_server.rs`): each revision (branch, tag, commit)
//! fetches its own bytes; a missing file, revision or repo fails naming it; a dropped
//! connection fails without hanging or leaving a corrupt cached file; the cache answers
//! again with the server gone, and what it does for a branch that moved; end to end, the
//! adapter registry and the base-model loader fetch `owner/name@revision` through the
//! [`HubOptions`] that `serve --hub-endpoint/--hub-cache` set. Every test has its own
//! server and cache folder and sets both options, so none reads the process environment
//! and they run in parallel.
mod common;
#[path = "hub_loading/hub_server.rs"]
mod hub_server;

use common::{TestServer, TINY_VOCAB};
use hub_server::{files_of, Fault, HubServer};
use multilora::hub::{HubOptions, HubRepo};
use multilora::lora::peft::LoraSite;
use multilora::lora::registry::{AdapterRegistry, AdapterState, RegistryConfig};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::model::placement::{load_model_on, Placement};
use multilora::model::{weights, CpuBackend};
use multilora::testing::{prefill_logits, random_llama, tiny_config, write_model_folder};
use std::path::{Path, PathBuf};
use std::time::Duration;

const SHA_MAIN: &str = "0123456789abcdef0123456789abcdef01234567";
const SHA_V1: &str = "89abcdef0123456789abcdef0123456789abcdef";
const SHA_NEXT: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// Options that point at `hub` and cache under `home` (as `HF_HOME`).
fn options(hub: &HubServer, home: &Path) -> HubOptions {
    HubOptions {
        endpoint: Some(hub.endpoint()),
        cache_dir: Some(home.to_path_buf()),
    }
}

/// Where hf-hub keeps `file` of `owner/files` at `commit` under `home`.
fn snapshot(home: &Path, commit: &str, file: &str) -> PathBuf {
    home.join("hub/models--owner--files/snapshots")
        .join(commit)
        .join(file)
}

/// What `owner/files` holds in `file` at the revision `tag` names.
fn bytes_of(tag: &str, file: &str) -> Vec<u8> {
    match file {
        "config.json" => format!("{{\"revision\": \"{tag}\"}}").into_bytes(),
        _ => format!("{file} at {tag}; ").repeat(200).into_bytes(),
    }
}

/// Publishes `owner/files` with branch `main` and tag `v1` on different commits, each
/// with a small config.json and an LFS-like weights.safetensors of its own.
fn two_revisions(hub: &HubServer) {
    for (revision, sha) in [("main", SHA_MAIN), ("v1", SHA_V1)] {
        let files = ["config.json", "weights.safetensors"]
            .iter()
            .map(|f| (f.to_string(), bytes_of(revision, f)))
            .collect();
        hub.publish("owner/files", revision, sha, files);
    }
}

fn open(opts: &HubOptions, revision: Option<&str>) -> HubRepo {
    HubRepo::open_with(opts, "owner/files", revision).unwrap()
}

/// `f` on its own thread; fails the test if it has not returned in 30 s (a hang).
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the Hub client hung")
}

#[test]
fn each_revision_fetches_its_own_bytes() {
    let hub = HubServer::start();
    two_revisions(&hub);
    let home = tempfile::tempdir().unwrap();
    let opts = options(&hub, home.path());
    let cases = [
        (None, SHA_MAIN, "main"),
        (Some("v1"), SHA_V1, "v1"),
        (Some(SHA_V1), SHA_V1, "v1"),
    ];
    for (revision, commit, tag) in cases {
        let repo = open(&opts, revision);
        for file in ["config.json", "weights.safetensors"] {
            let path = repo.fetch(file).unwrap();
            assert_eq!(path, snapshot(home.path(), commit, file), "{revision:?}");
            assert_eq!(std::fs::read(&path).unwrap(), bytes_of(tag, file));
        }
    }
}

#[test]
fn a_missing_file_is_an_error_naming_it_and_optional_gives_none() {
    let hub = HubServer::start();
    two_revisions(&hub);
    let home = tempfile::tempdir().unwrap();
    let repo = open(&options(&hub, home.path()), Some("v1"));
    let err = format!("{:#}", repo.fetch("tokenizer.json").unwrap_err());
    assert!(
        err.contains("owner/files has no file tokenizer.json at revision v1"),
        "{err}"
    );
    assert_eq!(repo.fetch_optional("tokenizer.json").unwrap(), None);
    assert_eq!(
        repo.fetch_optional("config.json").unwrap(),
        Some(snapshot(home.path(), SHA_V1, "config.json"))
    );
}

#[test]
fn an_unknown_revision_or_repo_is_a_clear_error() {
    let hub = HubServer::start();
    two_revisions(&hub);
    let home = tempfile::tempdir().unwrap();
    let opts = options(&hub, home.path());
    let repo = open(&opts, Some("no-such-branch"));
    let err = format!("{:#}", repo.fetch("config.json").unwrap_err());
    assert!(
        err.contains("Hub repo owner/files has no revision \"no-such-branch\""),
        "{err}"
    );
    assert!(err.contains("fetching config.json"), "{err}");
    // Not a missing file: an optional fetch fails too.
    assert!(repo.fetch_optional("config.json").is_err());
    let other = HubRepo::open_with(&opts, "owner/nothing", None).unwrap();
    let err = format!("{:#}", other.fetch("config.json").unwrap_err());
    assert!(err.contains("no Hub repo owner/nothing"), "{err}");
    assert!(!home.path().join("hub/models--owner--files").exists());
}

#[test]
fn dropped_connections_fail_without_hanging_or_a_corrupt_cached_file() {
    let hub = HubServer::start();
    two_revisions(&hub);
    let home = tempfile::tempdir().unwrap();
    let opts = options(&hub, home.path());
    let fetch = |file: &'static str| {
        let opts = opts.clone();
        within(move || {
            open(&opts, Some("v1"))
                .fetch(file)
                .map_err(|e| format!("{e:#}"))
        })
    };

    hub.set_fault(Fault::CloseUnanswered);
    let err = fetch("config.json").unwrap_err();
    assert!(
        err.contains("fetching config.json from Hub repo owner/files"),
        "{err}"
    );
    // An optional file the Hub cannot be asked about counts as absent.
    let opts2 = opts.clone();
    let optional = within(move || open(&opts2, Some("v1")).fetch_optional("config.json"));
    assert_eq!(optional.unwrap(), None);

    hub.set_fault(Fault::TruncateBodies);
    for file in ["config.json", "weights.safetensors"] {
        let err = fetch(file).unwrap_err();
        assert!(err.contains(&format!("fetching {file}")), "{err}");
        assert!(!snapshot(home.path(), SHA_V1, file).exists(), "{file}");
    }
    let blobs = home.path().join("hub/models--owner--files/blobs");
    for entry in std::fs::read_dir(&blobs).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        // Only partial downloads (and their locks), never a finished blob.
        assert!(name.ends_with(".part") || name.ends_with(".lock"), "{name}");
    }

    // A healthy server completes them (hf-hub resumes the partial download).
    hub.set_fault(Fault::None);
    for file in ["config.json", "weights.safetensors"] {
        let path = fetch(file).unwrap();
        assert_eq!(path, snapshot(home.path(), SHA_V1, file));
        assert_eq!(std::fs::read(&path).unwrap(), bytes_of("v1", file));
    }
}

#[test]
fn the_cache_answers_a_second_open_without_the_server() {
    let hub = HubServer::start();
    two_revisions(&hub);
    let home = tempfile::tempdir().unwrap();
    let opts = options(&hub, home.path());
    let revisions = [(Some(SHA_V1), SHA_V1, "v1"), (None, SHA_MAIN, "main")];
    for (revision, _, _) in revisions {
        open(&opts, revision).fetch("weights.safetensors").unwrap();
    }
    let asked = hub.requests();
    let again = open(&opts, Some(SHA_V1)).fetch("weights.safetensors");
    assert_eq!(
        again.unwrap(),
        snapshot(home.path(), SHA_V1, "weights.safetensors")
    );
    assert_eq!(hub.requests(), asked, "a cached file is not asked for");

    drop(hub);
    // Nothing listens at the endpoint now; a commit and a branch both come from cache.
    for (revision, commit, tag) in revisions {
        let path = within({
            let opts = opts.clone();
            move || open(&opts, revision).fetch("weights.safetensors").unwrap()
        });
        assert_eq!(path, snapshot(home.path(), commit, "weights.safetensors"));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes_of(tag, "weights.safetensors")
        );
    }
    // A file never fetched cannot come from the cache.
    let err = format!(
        "{:#}",
        open(&opts, Some(SHA_V1)).fetch("config.json").unwrap_err()
    );
    assert!(err.contains("fetching config.json"), "{err}");
}

#[test]
fn a_cached_branch_is_not_revalidated_until_an_uncached_file_moves_it() {
    let hub = HubServer::start();
    two_revisions(&hub);
    let home = tempfile::tempdir().unwrap();
    let opts = options(&hub, home.path());
    open(&opts, None).fetch("config.json").unwrap();
    // `main` moves on the server; the cache still maps it to the old commit.
    let files = vec![
        ("config.json".to_string(), bytes_of("next", "config.json")),
        ("extra.txt".to_string(), b"new file".to_vec()),
    ];
    hub.publish("owner/files", "main", SHA_NEXT, files);
    let asked = hub.requests();
    let path = open(&opts, None).fetch("config.json").unwrap();
    assert_eq!(path, snapshot(home.path(), SHA_MAIN, "config.json"));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes_of("main", "config.json")
    );
    assert_eq!(hub.requests(), asked);
    // Fetching a file not in the cache resolves `main` again and records the new
    // commit; from then on the old commit's files are not found for `main`.
    let extra = open(&opts, None).fetch("extra.txt").unwrap();
    assert_eq!(extra, snapshot(home.path(), SHA_NEXT, "extra.txt"));
    let path = open(&opts, None).fetch("config.json").unwrap();
    assert_eq!(path, snapshot(home.path(), SHA_NEXT, "config.json"));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes_of("next", "config.json")
    );
}

/// Publishes `owner/adapter`: a rank-8 LoRA on `main`, a rank-4 one on tag `v1`.
fn publish_adapters(hub: &HubServer, dir: &Path) {
    let base = TestServer::tiny().base_shape();
    for (revision, sha, rank) in [("main", SHA_MAIN, 8), ("v1", SHA_V1, 4)] {
        let folder = dir.join(revision);
        let spec = SynthSpec {
            kind: Default::default(),
            rank,
            alpha: 2.0 * rank as f32,
            sites: vec![LoraSite::Q, LoraSite::V],
            seed: rank as u64,
        };
        write_synthetic_adapter(&folder, &base, &spec).unwrap();
        hub.publish("owner/adapter", revision, sha, files_of(&folder));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapter_registry_loads_hub_adapters_at_their_revision() {
    let hub = HubServer::start();
    let dir = tempfile::tempdir().unwrap();
    publish_adapters(&hub, dir.path());
    let home = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        hub: options(&hub, home.path()),
        ..RegistryConfig::new(TestServer::tiny().base_shape())
    };
    let by_commit = format!("owner/adapter@{SHA_V1}");
    let specs: Vec<(String, String)> = [
        ("latest", "owner/adapter"),
        ("pinned", "owner/adapter@v1"),
        ("by-commit", by_commit.as_str()),
        ("bad", "owner/adapter@nope"),
    ]
    .iter()
    .map(|(n, s)| (n.to_string(), s.to_string()))
    .collect();
    let registry = AdapterRegistry::with_adapters(cfg, &specs).unwrap();
    for (name, rank) in [("latest", 8), ("pinned", 4), ("by-commit", 4)] {
        let info = registry.get(name).unwrap();
        assert_eq!(
            (info.state, info.rank),
            (AdapterState::Host, rank),
            "{name}"
        );
    }
    let bad = registry.get("bad").unwrap();
    assert_eq!(bad.state, AdapterState::Failed);
    assert!(bad.error.contains("no revision \"nope\""), "{}", bad.error);

    // `LoadAdapter` (a background load) of a cached revision, with the server gone.
    drop(hub);
    registry
        .load("reloaded", "owner/adapter@v1", None)
        .await
        .unwrap();
    assert_eq!(registry.get("reloaded").unwrap().rank, 4);
}

#[test]
fn the_base_model_loads_from_a_hub_repo_id_and_then_from_the_cache() {
    let cfg = tiny_config(TINY_VOCAB);
    let hub = HubServer::start();
    let dir = tempfile::tempdir().unwrap();
    // `main`: sharded weights from seed 5; tag `v1`: one file from seed 6.
    for (revision, sha, seed, sharded) in [("main", SHA_MAIN, 5, true), ("v1", SHA_V1, 6, false)] {
        let folder = dir.path().join(revision);
        std::fs::create_dir(&folder).unwrap();
        write_model_folder(&folder, &cfg, seed, sharded).unwrap();
        hub.publish("owner/tiny", revision, sha, files_of(&folder));
    }
    let home = tempfile::tempdir().unwrap();
    let opts = options(&hub, home.path());
    let tokens = [3u32, 70, 71, 72, 10];
    let expected = |seed| prefill_logits(&random_llama(&cfg, seed).unwrap(), &tokens).unwrap();
    let load = |revision| {
        let loaded =
            weights::load_llama_with("owner/tiny", revision, &opts, CpuBackend::default()).unwrap();
        assert_eq!(loaded.tokenizer.eos_token_ids(), &[2]);
        prefill_logits(&loaded.model, &tokens).unwrap()
    };
    assert_eq!(load(Some("v1")), expected(6));
    assert_eq!(load(None), expected(5));
    // What `serve` runs: the options reach the loader through `load_model_on`.
    let served = load_model_on("owner/tiny", Some("v1"), &opts, &Placement::default()).unwrap();
    assert_eq!(
        format!("{:?}", served.model.base_shape()),
        format!("{:?}", cfg.base_shape())
    );

    drop(hub);
    // Offline: both revisions load from the cache (the optional files the repos lack,
    // which hf-hub cannot know are absent, are skipped as unreachable).
    assert_eq!(load(Some("v1")), expected(6));
    assert_eq!(load(None), expected(5));
}
