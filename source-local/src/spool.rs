//! Reading the spool directory: which descriptor files there are, and the content of those
//! that changed since the last look. Blocking; run on the blocking pool.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::descriptor::Descriptor;

/// What identifies one version of a descriptor file without reading it: a file rewritten
/// in place changes its size or mtime (or ctime), one replaced by a rename its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Fingerprint {
    fn of(meta: &fs::Metadata) -> Fingerprint {
        Fingerprint {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }

    /// For a file that can't even be stat'ed: never equal to a real one, and equal to the
    /// next failure of the same kind (so it is not reported again and again).
    fn failed(kind: io::ErrorKind) -> Fingerprint {
        Fingerprint {
            dev: u64::MAX,
            ino: kind as u64,
            size: 0,
            mtime_ns: -1,
            ctime_ns: -1,
        }
    }
}

/// Why a descriptor file gives no descriptor. The messages name no path: they say what is
/// wrong with "it".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// Not JSON, or a field of the wrong type: `descriptor_malformed`.
    Malformed(String),
    /// Can't be read (I/O error, not a regular file): `descriptor_unreadable`.
    Unreadable(String),
    /// Over `max_descriptor_bytes`: `descriptor_too_large`.
    TooLarge(u64),
}

impl Problem {
    /// The diagnostic's code.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Problem::Malformed(_) => "descriptor_malformed",
            Problem::Unreadable(_) => "descriptor_unreadable",
            Problem::TooLarge(_) => "descriptor_too_large",
        }
    }

    /// The diagnostic's message, for the descriptor named `what`.
    pub(crate) fn message(&self, what: &str) -> String {
        match self {
            Problem::Malformed(why) => format!("{what} is malformed: {why}"),
            Problem::Unreadable(why) => format!("{what} can't be read: {why}"),
            Problem::TooLarge(max) => {
                format!("{what} is larger than max_descriptor_bytes ({max} bytes); it is not read")
            }
        }
    }
}

/// What the scan found of one descriptor file.
#[derive(Debug)]
pub(crate) enum Seen {
    /// The same version as last time: not read again.
    Unchanged,
    /// New or changed, with what it says now.
    Changed(Fingerprint, Result<Descriptor, Problem>),
}

/// One look at the spool directory.
pub(crate) struct Scan {
    /// Descriptor files by name, at most `max_files`, the first by name.
    pub(crate) files: Vec<(OsString, Seen)>,
    /// Descriptor files beyond `max_files` (neither read nor followed).
    pub(crate) beyond: usize,
}

impl std::fmt::Debug for Scan {
    // Redacting: file names are internal authority.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scan")
            .field("files", &self.files.len())
            .field("beyond", &self.beyond)
            .finish()
    }
}

/// Why the directory itself could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpoolError {
    /// It does not exist, or is not a directory.
    Missing,
    /// It exists but can't be listed (permissions, I/O).
    Unreadable(io::ErrorKind),
}

/// Lists the `*.json` files of `dir` and reads those whose fingerprint is not the one in
/// `known`. Follows symlinks. Keeps at most `max_files` names, so that a directory with
/// millions of files costs bounded memory: the files already known (still there) first,
/// then new ones by name; the rest are counted in `beyond`.
pub(crate) fn scan(
    dir: &Path,
    known: &HashMap<OsString, Fingerprint>,
    max_files: usize,
    max_bytes: u64,
) -> Result<Scan, SpoolError> {
    let entries = fs::read_dir(dir).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => SpoolError::Missing,
        kind => SpoolError::Unreadable(kind),
    })?;
    // Known names are at most `known.len()`; new ones are kept to `max_files` as they come.
    let mut names: BTreeSet<OsString> = BTreeSet::new();
    let mut new: BTreeSet<OsString> = BTreeSet::new();
    let mut dropped = 0usize;
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        if !is_descriptor_name(&name) {
            continue;
        }
        if known.contains_key(&name) && names.len() < max_files {
            names.insert(name);
            continue;
        }
        new.insert(name);
        if new.len() > max_files {
            new.pop_last();
            dropped += 1;
        }
    }
    let room = max_files.saturating_sub(names.len());
    let beyond = dropped + new.len().saturating_sub(room);
    names.extend(new.into_iter().take(room));
    let files = names
        .into_iter()
        .map(|name| {
            let seen = look(&dir.join(&name), known.get(&name), max_bytes);
            (name, seen)
        })
        .collect();
    Ok(Scan { files, beyond })
}

/// `<anything>.json`, with something before the dot.
pub(crate) fn is_descriptor_name(name: &std::ffi::OsStr) -> bool {
    let b = name.as_bytes();
    b.len() > ".json".len() && b.ends_with(b".json")
}

fn look(path: &Path, known: Option<&Fingerprint>, max_bytes: u64) -> Seen {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) => {
            let fp = Fingerprint::failed(e.kind());
            if known == Some(&fp) {
                return Seen::Unchanged;
            }
            let why = match e.kind() {
                io::ErrorKind::NotFound => "it names nothing (a dangling symbolic link?)".into(),
                kind => io_reason(kind),
            };
            return Seen::Changed(fp, Err(Problem::Unreadable(why)));
        }
    };
    let fp = Fingerprint::of(&meta);
    if known == Some(&fp) {
        return Seen::Unchanged;
    }
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "it is a directory, not a file"
        } else {
            "it is not a regular file"
        };
        return Seen::Changed(fp, Err(Problem::Unreadable(what.into())));
    }
    if meta.len() > max_bytes {
        return Seen::Changed(fp, Err(Problem::TooLarge(max_bytes)));
    }
    Seen::Changed(fp, read(path, max_bytes))
}

fn read(path: &Path, max_bytes: u64) -> Result<Descriptor, Problem> {
    let file = fs::File::open(path).map_err(|e| Problem::Unreadable(io_reason(e.kind())))?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells a file that grew since the stat.
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Problem::Unreadable(io_reason(e.kind())))?;
    if bytes.len() as u64 > max_bytes {
        return Err(Problem::TooLarge(max_bytes));
    }
    Descriptor::parse(&bytes).map_err(Problem::Malformed)
}

/// An I/O error as words, without the path (which `io::Error` does not hold, but its
/// `Display` is not ours to promise).
fn io_reason(kind: io::ErrorKind) -> String {
    match kind {
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        io::ErrorKind::NotFound => "it is gone".into(),
        io::ErrorKind::IsADirectory => "it is a directory, not a file".into(),
        kind => format!("I/O error ({kind})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_reads_changed_files_only_and_names_problems_without_paths() {
        let dir = tempfile::tempdir().unwrap();
        let good = r#"{"pid": 1, "started_at": "2024-05-01T12:00:00Z"}"#;
        fs::write(dir.path().join("a.json"), good).unwrap();
        fs::write(dir.path().join("b.json"), "{nope").unwrap();
        fs::write(dir.path().join("c.json"), "x".repeat(200)).unwrap();
        fs::create_dir(dir.path().join("d.json")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("missing"), dir.path().join("e.json")).unwrap();
        fs::write(dir.path().join("f.tmp"), good).unwrap();
        fs::write(dir.path().join(".json"), good).unwrap();

        let scan1 = scan(dir.path(), &HashMap::new(), 100, 100).unwrap();
        let names: Vec<String> = scan1
            .files
            .iter()
            .map(|(n, _)| n.to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.json", "b.json", "c.json", "d.json", "e.json"]);
        let mut known = HashMap::new();
        let mut codes = Vec::new();
        for (name, seen) in scan1.files {
            let Seen::Changed(fp, result) = seen else {
                panic!("a first scan sees every file as changed");
            };
            known.insert(name, fp);
            match result {
                Ok(d) => codes.push(format!("ok {}", *d.pid)),
                Err(p) => {
                    let message = p.message("descriptor #1");
                    assert!(
                        !message.contains(&*dir.path().to_string_lossy()),
                        "{message}"
                    );
                    codes.push(p.code().to_string());
                }
            }
        }
        assert_eq!(
            codes,
            [
                "ok 1",
                "descriptor_malformed",
                "descriptor_too_large",
                "descriptor_unreadable",
                "descriptor_unreadable"
            ]
        );
        // Nothing changed: nothing is read again.
        let scan2 = scan(dir.path(), &known, 100, 100).unwrap();
        assert!(scan2
            .files
            .iter()
            .all(|(_, s)| matches!(s, Seen::Unchanged)));
        // A rewrite by rename is seen.
        fs::write(
            dir.path().join("tmp"),
            r#"{"pid": 2, "started_at": "2024-05-01T12:00:00Z"}"#,
        )
        .unwrap();
        fs::rename(dir.path().join("tmp"), dir.path().join("a.json")).unwrap();
        let scan3 = scan(dir.path(), &known, 100, 100).unwrap();
        match &scan3.files[0].1 {
            Seen::Changed(_, Ok(d)) => assert_eq!(d.pid, 2),
            other => panic!("expected the rewritten descriptor, got {other:?}"),
        }
    }

    #[test]
    fn scan_keeps_at_most_max_files_names_and_counts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..10 {
            fs::write(dir.path().join(format!("w{i}.json")), "{}").unwrap();
        }
        let s = scan(dir.path(), &HashMap::new(), 4, 100).unwrap();
        let names: Vec<String> = s
            .files
            .iter()
            .map(|(n, _)| n.to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["w0.json", "w1.json", "w2.json", "w3.json"]);
        assert_eq!(s.beyond, 6);
        // Files already known keep their place when new ones come before them by name.
        let known: HashMap<OsString, Fingerprint> = ["w7.json", "w8.json"]
            .into_iter()
            .map(|n| (OsString::from(n), Fingerprint::failed(io::ErrorKind::Other)))
            .collect();
        let s = scan(dir.path(), &known, 4, 100).unwrap();
        let names: Vec<String> = s
            .files
            .iter()
            .map(|(n, _)| n.to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["w0.json", "w1.json", "w7.json", "w8.json"]);
        assert_eq!(s.beyond, 6);
    }

    #[test]
    fn a_missing_spool_dir_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("nope");
        assert_eq!(
            scan(&gone, &HashMap::new(), 4, 100).unwrap_err(),
            SpoolError::Missing
        );
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        assert_eq!(
            scan(&file, &HashMap::new(), 4, 100).unwrap_err(),
            SpoolError::Missing
        );
    }
}
