//! The data directory's format: which layout of files, tables and records a replica's data
//! directory holds, written in its `FORMAT` file, and the migrations that bring an older
//! directory forward when `tallyd` opens it (`docs/formats.md` lists every format and version).
//!
//! ```text
//!  data/FORMAT     "tally data format 2\n"   (absent: format 1, release 0.3, or a new directory)
//!  data/log/       the Raft log (wal.rs)
//!  data/state/     LevelDB (state.rs; each table's id carries the table's version, codec keys.rs)
//!  data/segments/  batch bodies and ids (segments.rs)
//!
//!  prepare(dir): read the format ─▶ newer than this binary: refuse, naming both formats
//!                                ─▶ older: each migration in order ─▶ FORMAT replaced atomically
//!                                ─▶ current: nothing to do                       after each one
//! ```
//!
//! A migration is crash-safe: its work is durable before `FORMAT` names the next format (a
//! temporary file, fsynced, renamed over `FORMAT`, the directory fsynced), and a migration run
//! again over its own half-done work finishes it. A crash at any point leaves a directory that
//! opens and migrates again.

use crate::kv::{Kv, LevelKv};
use crate::StoreError;
use std::fs;
use std::io::Write;
use std::path::Path;
use tally_codec::Tables;

/// The format this binary writes.
pub const DATA_FORMAT: u32 = 2;

/// Every format this binary opens, oldest first, with what it added.
pub const FORMATS: [(u32, &str); 2] = [
    (1, "release 0.3 (tag v0.3.0): the Raft log, LevelDB tables of schema fingerprint v1 (documents v2, batches v2, requests v3), batch bodies and ids in segment files; no FORMAT file"),
    (2, "the FORMAT file names the data directory's format; nothing else changed, so release 0.3 still opens it"),
];

/// The name of the file that holds the format.
pub const FORMAT_FILE: &str = "FORMAT";

/// How far a migration is, for a progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The format being migrated to.
    pub to: u32,
    /// Units done and in all (keys, files: whatever the migration counts).
    pub done: u64,
    pub total: u64,
}

/// What [`prepare`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The format the directory held (`None`: a new directory).
    pub found: Option<u32>,
    /// The migrations run, as (from, to).
    pub migrated: Vec<(u32, u32)>,
}

/// A migration's work on a data directory, reporting its progress.
type MigrationRun = fn(&Path, &mut dyn FnMut(Progress)) -> Result<(), StoreError>;

/// One step forward.
struct Migration {
    from: u32,
    run: MigrationRun,
}

/// Every migration, in order: `MIGRATIONS[i]` takes format `i + 1` to `i + 2`.
const MIGRATIONS: [Migration; 1] = [Migration { from: 1, run: migrate_1_to_2 }];

const _: () = assert!(MIGRATIONS.len() as u32 + 1 == DATA_FORMAT, "one migration per format step");
const _: () = assert!(FORMATS.len() as u32 == DATA_FORMAT, "every format is listed");

/// Makes `dir` hold [`DATA_FORMAT`]: a new directory is marked with it, an older one is
/// migrated forward in place, a newer one is refused. Call before opening the store and the log.
///
/// # Errors
/// [`StoreError::FormatTooNew`], [`StoreError::FormatUnknown`]; I/O and LevelDB errors of a
/// migration (run `prepare` again: it resumes).
pub fn prepare(dir: &Path, progress: &mut dyn FnMut(Progress)) -> Result<Prepared, StoreError> {
    fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
    let found = read_format(dir)?;
    let mut prepared = Prepared { found, migrated: Vec::new() };
    let Some(mut at) = found else {
        write_format(dir, DATA_FORMAT)?;
        return Ok(prepared);
    };
    if at > DATA_FORMAT {
        return Err(StoreError::FormatTooNew { found: at, newest: DATA_FORMAT });
    }
    while at < DATA_FORMAT {
        let step = &MIGRATIONS[at as usize - 1];
        assert_eq!(step.from, at, "migrations are listed in order");
        (step.run)(dir, progress)?;
        assert_eq!(read_format(dir)?, Some(at + 1), "a migration ends by writing the next format");
        prepared.migrated.push((at, at + 1));
        at += 1;
    }
    Ok(prepared)
}

/// The directory's format: from `FORMAT`, or 1 for a directory of release 0.3 (which wrote
/// none), or `None` for a directory that holds no data yet.
///
/// # Errors
/// [`StoreError::FormatUnknown`] for an unreadable `FORMAT`, or data without one that is not
/// release 0.3's; I/O and LevelDB errors.
pub fn read_format(dir: &Path) -> Result<Option<u32>, StoreError> {
    let path = dir.join(FORMAT_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => parse_format(&text).map(Some).ok_or_else(|| {
            StoreError::FormatUnknown(format!("{} holds {text:?}, not \"tally data format N\"", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if holds_data(dir)? {
                release_0_3_schema(dir)?;
                Ok(Some(1))
            } else {
                Ok(None)
            }
        }
        Err(e) => Err(StoreError::io(&path, e)),
    }
}

fn parse_format(text: &str) -> Option<u32> {
    text.strip_prefix("tally data format ")?.trim_end().parse().ok().filter(|n| *n >= 1)
}

/// Whether the directory holds a log, a state store or segments (format 1 wrote no `FORMAT`).
fn holds_data(dir: &Path) -> Result<bool, StoreError> {
    for sub in ["log", "state", "segments"] {
        let path = dir.join(sub);
        match fs::read_dir(&path) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&path, e)),
        }
    }
    Ok(false)
}

/// Checks that a directory without `FORMAT` holds release 0.3's tables (or no state yet).
fn release_0_3_schema(dir: &Path) -> Result<(), StoreError> {
    let state = dir.join("state");
    if !state.exists() {
        return Ok(());
    }
    let kv = LevelKv::open(&state)?;
    let tables = Tables::v1();
    let found = kv.get(&tables.meta("schema").into_bytes())?;
    match found {
        Some(f) if f == tables.fingerprint() => Ok(()),
        None if kv.scan_prefix(&[], 1)?.is_empty() => Ok(()),
        _ => Err(StoreError::FormatUnknown(format!(
            "{} holds tables of a release before 0.3 (schema {}), which no migration reads: \
             start this replica from an empty data directory and let it catch up from the others, \
             or restore a backup",
            state.display(),
            found.map_or("missing".into(), |f| f.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>())
        ))),
    }
}

/// Replaces `FORMAT` atomically and durably: a temporary file, fsynced, renamed, the directory
/// fsynced.
///
/// # Errors
/// I/O errors.
pub fn write_format(dir: &Path, format: u32) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{FORMAT_FILE}.tmp"));
    let path = dir.join(FORMAT_FILE);
    let mut f = fs::File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
    f.write_all(format!("tally data format {format}\n").as_bytes()).map_err(|e| StoreError::io(&tmp, e))?;
    f.sync_all().map_err(|e| StoreError::io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| StoreError::io(&path, e))?;
    crate::fsutil::sync_dir(&*crate::disk::OsDisk::new(), dir)
}

/// 1 → 2: release 0.3's layout is kept as it is; the directory gains `FORMAT`. Its tables were
/// checked when the format was read.
fn migrate_1_to_2(dir: &Path, progress: &mut dyn FnMut(Progress)) -> Result<(), StoreError> {
    progress(Progress { to: 2, done: 0, total: 1 });
    write_format(dir, 2)?;
    progress(Progress { to: 2, done: 1, total: 1 });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Store;

    fn no_progress() -> impl FnMut(Progress) {
        |_| {}
    }

    #[test]
    fn a_new_directory_is_marked_with_the_current_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = prepare(dir.path(), &mut no_progress()).expect("prepare");
        assert_eq!(p, Prepared { found: None, migrated: vec![] });
        assert_eq!(read_format(dir.path()).expect("read"), Some(DATA_FORMAT));
        assert_eq!(fs::read_to_string(dir.path().join("FORMAT")).expect("file"), "tally data format 2\n");
    }

    #[test]
    fn a_directory_with_data_and_no_format_file_is_format_1_and_is_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("a store as release 0.3 wrote it"));
        assert_eq!(read_format(dir.path()).expect("read"), Some(1));
        let mut seen = Vec::new();
        let p = prepare(dir.path(), &mut |pr| seen.push(pr)).expect("prepare");
        assert_eq!(p, Prepared { found: Some(1), migrated: vec![(1, 2)] });
        assert_eq!(seen.last(), Some(&Progress { to: 2, done: 1, total: 1 }));
        assert_eq!(read_format(dir.path()).expect("read"), Some(2));
        Store::open(dir.path()).expect("opens after the migration");
        let again = prepare(dir.path(), &mut no_progress()).expect("again");
        assert_eq!(again, Prepared { found: Some(2), migrated: vec![] }, "nothing to do the second time");
    }

    #[test]
    fn a_newer_format_is_refused_naming_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_format(dir.path(), DATA_FORMAT + 1).expect("write");
        let e = prepare(dir.path(), &mut no_progress()).expect_err("newer");
        assert!(
            matches!(e, StoreError::FormatTooNew { found, newest } if found == DATA_FORMAT + 1 && newest == DATA_FORMAT)
        );
        let text = e.to_string();
        assert!(text.contains("format 3") && text.contains("1 to 2"), "{text}");
    }

    #[test]
    fn tables_of_a_release_before_0_3_are_refused_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut kv = LevelKv::open(&dir.path().join("state")).expect("kv");
        kv.write(&[tally_codec::WriteOp { key: Tables::v1().meta("schema").into_bytes(), value: Some(vec![7; 32]) }])
            .expect("write");
        drop(kv);
        let e = prepare(dir.path(), &mut no_progress()).expect_err("old tables");
        assert!(matches!(e, StoreError::FormatUnknown(_)), "{e}");
        assert!(e.to_string().contains("before 0.3") && e.to_string().contains("empty data directory"), "{e}");
        assert!(!dir.path().join("FORMAT").exists(), "nothing written to a directory it cannot read");
    }

    #[test]
    fn a_garbled_format_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("FORMAT"), "tally data format x\n").expect("write");
        assert!(matches!(prepare(dir.path(), &mut no_progress()), Err(StoreError::FormatUnknown(_))));
    }

    #[test]
    fn a_crash_before_the_rename_leaves_the_old_format_and_migrates_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("store"));
        // The temporary file written, the rename not done: what a crash inside write_format leaves.
        fs::write(dir.path().join("FORMAT.tmp"), "tally data format 2\n").expect("tmp");
        assert_eq!(read_format(dir.path()).expect("read"), Some(1));
        let p = prepare(dir.path(), &mut no_progress()).expect("prepare");
        assert_eq!(p.migrated, vec![(1, 2)]);
        assert_eq!(read_format(dir.path()).expect("read"), Some(2));
    }
}
