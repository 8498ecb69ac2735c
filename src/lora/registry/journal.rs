//! The adapter journal: the file in the state folder where runtime adapter operations
//! (loads, replacements, unloads) are recorded, so a restarted server comes back with
//! the same names, sources and versions. It owns the on-disk format (one JSON object a
//! line: `{"op":"load"|"replace"|"unload","name":..,"source":..,"version":N}`), reading
//! and folding it into a final state per name, and appending.
//!
//! Invariants: a record is appended with one `write_all` of the whole line (newline
//! included) on a file opened for appending, then `sync_data`, so a crash leaves at most
//! one torn line, at the end; a line that does not parse (torn, corrupt, not UTF-8, a
//! record missing what its op needs) is skipped with a warning and never stops the
//! fold; a missing file is an empty journal. Opening rewrites the file as its folded
//! state (a temporary file renamed over it), so the journal holds one line per name
//! and never ends in a torn line that the next append would be glued to. Versions in
//! the journal only grow per name (the registry numbers past every journaled one). One
//! open journal per folder: an exclusive lock on `adapters.lock` is held while open.
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The journal's file name inside the state folder.
pub const JOURNAL_FILE: &str = "adapters.jsonl";

/// The file whose exclusive lock says a server has the state folder open.
const LOCK_FILE: &str = "adapters.lock";

/// Versions at or above this are corrupt (JSON integers are exact below 2^53, and a
/// registry would never count that far), so a bad record cannot exhaust the numbering.
const MAX_VERSION: u64 = 1 << 53;

/// What a record says happened to a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A name loaded from `source` at `version`.
    Load,
    /// A load of a name the journal already had loaded (folds as `Load`).
    Replace,
    /// A name removed; `version` is the last one it had (0 if never loaded).
    Unload,
}

/// One journal line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub op: Op,
    pub name: String,
    /// The source as the registry admitted it (empty for an unload).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    pub version: u64,
}

/// Where a name stands once the journal is folded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Final {
    Loaded { source: String, version: u64 },
    Unloaded { version: u64 },
}

impl Final {
    fn version(&self) -> u64 {
        match self {
            Self::Loaded { version, .. } | Self::Unloaded { version } => *version,
        }
    }

    fn record(&self, name: &str) -> Record {
        match self {
            Self::Loaded { source, version } => Record {
                op: Op::Load,
                name: name.to_string(),
                source: source.clone(),
                version: *version,
            },
            Self::Unloaded { version } => Record {
                op: Op::Unload,
                name: name.to_string(),
                source: String::new(),
                version: *version,
            },
        }
    }
}

/// A journal folded: the last word on each name, in name order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    pub names: BTreeMap<String, Final>,
    /// The largest version any record named.
    pub max_version: u64,
    /// Lines skipped because they did not parse.
    pub skipped: usize,
}

impl Folded {
    /// Applies one record: the last record on a name wins.
    pub fn apply(&mut self, rec: Record) {
        self.max_version = self.max_version.max(rec.version);
        settle(&mut self.names, rec);
    }
}

/// `names` after `rec`; an unload keeps the largest version the name had.
fn settle(names: &mut BTreeMap<String, Final>, rec: Record) {
    let previous = names.get(&rec.name).map_or(0, Final::version);
    let state = match rec.op {
        Op::Load | Op::Replace => Final::Loaded {
            source: rec.source,
            version: rec.version,
        },
        Op::Unload => Final::Unloaded {
            version: rec.version.max(previous),
        },
    };
    names.insert(rec.name, state);
}

/// One line as a record, or why it is not one.
fn parse_line(line: &[u8]) -> Result<Record, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_string())?;
    let rec: Record = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if rec.name.is_empty() {
        return Err("no name".into());
    }
    if rec.op != Op::Unload && (rec.source.is_empty() || rec.version == 0) {
        return Err("a load without a source or a version".into());
    }
    if rec.version >= MAX_VERSION {
        return Err(format!("version {} is out of range", rec.version));
    }
    Ok(rec)
}

/// Folds the journal's bytes; bad lines are skipped with a warning naming `origin`.
pub fn fold(bytes: &[u8], origin: &Path) -> Folded {
    let mut folded = Folded::default();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_line(line) {
            Ok(rec) => folded.apply(rec),
            Err(why) => {
                folded.skipped += 1;
                tracing::warn!(
                    journal = %origin.display(),
                    line = i + 1,
                    reason = %why,
                    "skipping an adapter journal entry that does not parse (torn or corrupt)"
                );
            }
        }
    }
    folded
}

/// The open journal: the file, appended to, and its folded state.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    state: BTreeMap<String, Final>,
    /// An append failed part-way: the next one starts on a fresh line.
    torn: bool,
    /// Held locked while the journal is open: one server per state folder.
    _lock: File,
}

impl Journal {
    /// Opens the journal in `dir` (created if missing): folds what is there, rewrites
    /// the file as that folded state, and opens it for appending. An error if another
    /// open journal (this process or another) holds `dir`.
    pub fn open(dir: &Path) -> Result<(Self, Folded)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the state folder {}", dir.display()))?;
        let lock = lock_folder(dir)?;
        let path = dir.join(JOURNAL_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let folded = fold(&bytes, &path);
        compact(dir, &path, &folded.names)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {} for appending", path.display()))?;
        let journal = Self {
            path,
            file,
            state: folded.names.clone(),
            torn: false,
            _lock: lock,
        };
        Ok((journal, folded))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the journal's last word on `name` is a load.
    pub fn is_loaded(&self, name: &str) -> bool {
        matches!(self.state.get(name), Some(Final::Loaded { .. }))
    }

    /// Appends `rec` and syncs it to disk, unless it says what the journal already
    /// says about its name.
    pub fn append(&mut self, rec: Record) -> Result<()> {
        let unchanged = match (self.state.get(&rec.name), rec.op) {
            (Some(Final::Loaded { source, version }), Op::Load | Op::Replace) => {
                *source == rec.source && *version == rec.version
            }
            (Some(Final::Unloaded { .. }), Op::Unload) => true,
            _ => false,
        };
        if unchanged {
            return Ok(());
        }
        let mut line = if self.torn {
            "\n".to_string()
        } else {
            String::new()
        };
        line.push_str(&serde_json::to_string(&rec).context("encoding a journal record")?);
        line.push('\n');
        self.torn = true;
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("appending to {}", self.path.display()))?;
        self.torn = false;
        settle(&mut self.state, rec);
        Ok(())
    }
}

/// The state folder's lock file, locked exclusively (released when it is closed).
fn lock_folder(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "the state folder {} is in use by another server",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Replaces the file at `path` with one record per name of `names`: written to a
/// temporary file in `dir`, synced, renamed over it, and the folder synced.
fn compact(dir: &Path, path: &Path, names: &BTreeMap<String, Final>) -> Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut text = String::new();
    for (name, state) in names {
        text.push_str(&serde_json::to_string(&state.record(name)).context("encoding")?);
        text.push('\n');
    }
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    write().with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing the state folder {}", dir.display()))
}

#[cfg(test)]
#[path = "journal_tests.rs"]
mod tests;
