//! The journal's format: folding in order, torn and corrupt lines skipped, compaction.
use super::*;

fn load(name: &str, source: &str, version: u64) -> Record {
    Record {
        op: Op::Load,
        name: name.into(),
        source: source.into(),
        version,
    }
}

fn line(rec: &Record) -> String {
    format!("{}\n", serde_json::to_string(rec).unwrap())
}

fn loaded(source: &str, version: u64) -> Final {
    Final::Loaded {
        source: source.into(),
        version,
    }
}

#[test]
fn the_last_record_on_a_name_wins() {
    let mut text = String::new();
    text += &line(&load("a", "/r/a1", 3));
    text += &line(&load("b", "/r/b", 4));
    text += &line(&Record {
        op: Op::Replace,
        ..load("a", "/r/a2", 7)
    });
    text += &line(&Record {
        op: Op::Unload,
        name: "b".into(),
        source: String::new(),
        version: 0,
    });
    text += &line(&load("c", "/r/c", 5));
    text += &line(&Record {
        op: Op::Unload,
        ..load("c", "", 5)
    });
    text += &line(&load("c", "/r/c2", 9));
    let folded = fold(text.as_bytes(), Path::new("j"));
    assert_eq!(folded.skipped, 0);
    assert_eq!(folded.max_version, 9);
    let want: Vec<(&str, Final)> = vec![
        ("a", loaded("/r/a2", 7)),
        // An unload keeps the last version the name had.
        ("b", Final::Unloaded { version: 4 }),
        ("c", loaded("/r/c2", 9)),
    ];
    let got: Vec<(&str, Final)> = folded
        .names
        .iter()
        .map(|(n, f)| (n.as_str(), f.clone()))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn the_wire_format_is_one_json_object_a_line() {
    assert_eq!(
        line(&load("a", "/r/a", 3)),
        "{\"op\":\"load\",\"name\":\"a\",\"source\":\"/r/a\",\"version\":3}\n"
    );
    let unload = Record {
        op: Op::Unload,
        name: "a".into(),
        source: String::new(),
        version: 3,
    };
    assert_eq!(
        line(&unload),
        "{\"op\":\"unload\",\"name\":\"a\",\"version\":3}\n"
    );
}

#[test]
fn torn_and_corrupt_lines_are_skipped_and_the_rest_folds() {
    let good = line(&load("a", "/r/a", 3));
    let later = line(&load("b", "/r/b", 4));
    let mut bytes = Vec::new();
    bytes.extend_from_slice(good.as_bytes());
    bytes.extend_from_slice(b"garbage\n");
    bytes.extend_from_slice(b"{\"op\":\"explode\",\"name\":\"a\",\"version\":1}\n");
    bytes.extend_from_slice(b"{\"op\":\"load\",\"name\":\"a\",\"version\":8}\n"); // no source
    bytes.extend_from_slice(b"{\"op\":\"load\",\"name\":\"\",\"source\":\"/x\",\"version\":8}\n");
    bytes.extend_from_slice(b"{\"op\":\"unload\",\"name\":\"\xff\xfe\",\"version\":1}\n");
    let huge = format!(
        "{{\"op\":\"load\",\"name\":\"h\",\"source\":\"/x\",\"version\":{}}}\n",
        u64::MAX
    );
    bytes.extend_from_slice(huge.as_bytes());
    bytes.extend_from_slice(b"\n   \n");
    bytes.extend_from_slice(later.as_bytes());
    // A torn tail: the start of a record, no newline.
    bytes.extend_from_slice(&later.as_bytes()[..later.len() / 2]);
    let folded = fold(&bytes, Path::new("j"));
    assert_eq!(folded.skipped, 7);
    assert_eq!(folded.names.len(), 2);
    assert_eq!(folded.names["a"], loaded("/r/a", 3));
    assert_eq!(folded.names["b"], loaded("/r/b", 4));
    assert_eq!(folded.max_version, 4);
}

#[test]
fn a_missing_journal_is_empty_and_its_folder_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state").join("deeper");
    let (_j, folded) = Journal::open(&dir).unwrap();
    assert_eq!(folded, Folded::default());
    assert!(dir.join(JOURNAL_FILE).is_file());
}

#[test]
fn one_open_journal_per_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(tmp.path()).unwrap();
    let err = Journal::open(tmp.path()).unwrap_err();
    assert!(format!("{err:#}").contains("in use"), "{err:#}");
    drop(j);
    Journal::open(tmp.path()).unwrap();
}

#[test]
fn opening_compacts_and_appends_go_on_fresh_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(JOURNAL_FILE);
    let mut text = line(&load("a", "/r/a", 3));
    text += &line(&load("a", "/r/a2", 5));
    text += "{\"op\":\"load\",\"na"; // torn
    std::fs::write(&path, &text).unwrap();
    let (mut j, folded) = Journal::open(tmp.path()).unwrap();
    assert_eq!(folded.skipped, 1);
    // One line per name, the torn tail gone.
    let compacted = std::fs::read_to_string(&path).unwrap();
    assert_eq!(compacted, line(&load("a", "/r/a2", 5)));
    assert!(!tmp.path().join("adapters.jsonl.tmp").exists());
    j.append(load("b", "/r/b", 6)).unwrap();
    // What the journal already says is not written again.
    j.append(load("a", "/r/a2", 5)).unwrap();
    j.append(Record {
        op: Op::Unload,
        ..load("a", "", 5)
    })
    .unwrap();
    drop(j);
    let (_j, folded) = Journal::open(tmp.path()).unwrap();
    assert_eq!(folded.skipped, 0);
    assert_eq!(folded.names["a"], Final::Unloaded { version: 5 });
    assert_eq!(folded.names["b"], loaded("/r/b", 6));
    assert_eq!(folded.max_version, 6);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
}
