//! The confinement corpus: sources that escape the roots, or are not paths at all, are
//! refused with one message (apart from the echo of the source), whether the target
//! exists or not; folders inside a root, relative or absolute, are admitted canonical.
use super::*;
use std::os::unix::fs::symlink;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

/// A root holding `ok/` and `escape -> ../outside`, beside `outside/` and a file.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("ok")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("file"), "x").unwrap();
    symlink(&outside, root.join("escape")).unwrap();
    Fixture {
        root: root.canonicalize().unwrap(),
        outside: outside.canonicalize().unwrap(),
        _dir: dir,
    }
}

/// The refusal's text with the echoed source taken out.
fn refusal_text(policy: &SourcePolicy, spec: &str) -> String {
    match policy.admit(spec) {
        Err(RequestError::PermissionDenied(m)) => m.replace(&echo(spec), "<source>"),
        other => panic!("{spec:?} was not refused: {other:?}"),
    }
}

#[test]
fn sources_outside_the_roots_get_one_refusal() {
    let f = fixture();
    let policy = SourcePolicy::confined(std::slice::from_ref(&f.root), false).unwrap();
    let outside = f.outside.to_string_lossy().to_string();
    let huge = "a/".repeat(500_000);
    let corpus = [
        "/etc".to_string(),
        "/etc-that-does-not-exist".to_string(),
        outside.clone(),
        format!("{outside}/missing"),
        "../outside".to_string(),
        "ok/../../outside".to_string(),
        "%2e%2e/".to_string(),
        "escape".to_string(),
        "missing".to_string(),
        "file".to_string(),
        "./ok".to_string(),
        "ok\0".to_string(),
        String::new(),
        format!("{}/../outside", f.root.display()),
        "owner/name".to_string(),
        huge,
    ];
    let first = refusal_text(&policy, &corpus[0]);
    for spec in &corpus {
        assert_eq!(refusal_text(&policy, spec), first, "{:?}", echo(spec));
    }
    let big = policy
        .admit(&corpus[corpus.len() - 1])
        .unwrap_err()
        .to_string();
    assert!(
        big.len() < 400,
        "the refusal echoes too much: {} bytes",
        big.len()
    );
}

#[test]
fn folders_inside_a_root_are_admitted_canonical() {
    let f = fixture();
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir(other.path().join("second")).unwrap();
    let roots = [f.root.clone(), other.path().to_path_buf()];
    let policy = SourcePolicy::confined(&roots, false).unwrap();
    let ok = f.root.join("ok").to_string_lossy().to_string();
    assert_eq!(policy.admit("ok").unwrap(), ok);
    assert_eq!(policy.admit(&ok).unwrap(), ok);
    // Relative sources resolve against the roots in order.
    let second = other.path().canonicalize().unwrap().join("second");
    assert_eq!(policy.admit("second").unwrap(), second.to_string_lossy());
}

#[test]
fn hub_ids_need_their_flag() {
    let f = fixture();
    let roots = std::slice::from_ref(&f.root);
    let closed = SourcePolicy::confined(roots, false).unwrap();
    let open = SourcePolicy::confined(roots, true).unwrap();
    for spec in ["owner/name", "owner/name@v1.0", "owner/name@refs/pr/1"] {
        assert!(matches!(
            closed.admit(spec),
            Err(RequestError::PermissionDenied(_))
        ));
        assert_eq!(open.admit(spec).unwrap(), spec);
    }
    for spec in [
        "owner/../x",
        "/owner/name",
        "owner/name@../x",
        ".x/name",
        "a/b/c",
    ] {
        assert!(open.admit(spec).is_err(), "{spec}");
    }
}

#[test]
fn unconfined_admits_as_given_and_echo_is_cut() {
    assert_eq!(SourcePolicy::unconfined().admit("/etc").unwrap(), "/etc");
    assert_eq!(echo("short"), "\"short\"");
    let long = "é".repeat(100);
    let cut = echo(&long);
    assert!(
        cut.starts_with(&format!("{:?}...", "é".repeat(ECHO_CHARS))),
        "{cut}"
    );
    assert!(cut.ends_with("... (200 bytes)"), "{cut}");
}

#[test]
fn a_missing_root_is_an_error_at_start() {
    let err = SourcePolicy::confined(&[PathBuf::from("/no/such/root")], false).unwrap_err();
    assert!(format!("{err:#}").contains("/no/such/root"));
}
