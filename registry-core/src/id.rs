//! Identity: runtime ids, worker ids and the source keys behind them.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize, Serializer};

use crate::{Redacted, RegistryError};

/// The config name of a runtime: `^[a-z][a-z0-9-]{0,62}$`. Chosen by the operator, public.
///
/// Shared text: every clone (one in each of a runtime's worker views) is the same
/// allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct RuntimeId(Arc<str>);

impl RuntimeId {
    /// Validates `name` as a runtime id.
    pub fn new(name: &str) -> Result<Self, RegistryError> {
        let mut chars = name.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if first_ok && rest_ok && name.len() <= 63 {
            Ok(RuntimeId(Arc::from(name)))
        } else {
            Err(RegistryError::InvalidRequest(format!(
                "runtime name {:?} is not valid: it must start with a lowercase letter, hold only \
                 lowercase letters, digits and '-', and be at most 63 characters",
                truncate(name, 80)
            )))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RuntimeId {
    type Error = RegistryError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        RuntimeId::new(&value)
    }
}

impl From<RuntimeId> for String {
    fn from(value: RuntimeId) -> Self {
        value.0.to_string()
    }
}

impl Serialize for RuntimeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl fmt::Display for RuntimeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RuntimeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RuntimeId({})", self.0)
    }
}

/// The Crockford base32 alphabet (no I, L, O, U).
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Characters of a worker id after the `w_` prefix.
const WORKER_ID_CHARS: usize = 26;

/// A worker id: `w_` + 26 characters of Crockford base32 (130 bits), issued by the registry.
///
/// Held inline (28 ASCII bytes, no allocation): the registry keeps a worker's id in its
/// table, its index, its view and its routing map. Ordered as its text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct WorkerId([u8; 2 + WORKER_ID_CHARS]);

impl WorkerId {
    /// Whether `text` has the shape of a worker id: `w_` and 26 characters of Crockford
    /// base32.
    pub fn has_shape(text: &str) -> bool {
        text.len() == 2 + WORKER_ID_CHARS
            && text.starts_with("w_")
            && text[2..].bytes().all(|b| CROCKFORD.contains(&b))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Every constructor puts ASCII here (`w_` and the Crockford alphabet).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// An id of the right shape, as bytes.
    fn from_shaped(text: &str) -> Self {
        let mut bytes = [0u8; 2 + WORKER_ID_CHARS];
        bytes.copy_from_slice(text.as_bytes());
        WorkerId(bytes)
    }

    fn from_digest(digest: &[u8; 32]) -> Self {
        // Take the first 130 bits, five at a time.
        let mut out = [0u8; 2 + WORKER_ID_CHARS];
        out[..2].copy_from_slice(b"w_");
        for i in 0..WORKER_ID_CHARS {
            let bit = i * 5;
            let (byte, shift) = (bit / 8, bit % 8);
            let pair = (u16::from(digest[byte]) << 8) | u16::from(digest[byte + 1]);
            let index = (pair >> (11 - shift)) & 0x1f;
            out[2 + i] = CROCKFORD[index as usize];
        }
        WorkerId(out)
    }
}

impl Serialize for WorkerId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl FromStr for WorkerId {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if WorkerId::has_shape(s) {
            Ok(WorkerId::from_shaped(s))
        } else {
            Err(RegistryError::WorkerNotFound(format!(
                "{:?} is not a worker id (they look like w_ followed by 26 characters)",
                truncate(s, 40)
            )))
        }
    }
}

impl TryFrom<String> for WorkerId {
    type Error = RegistryError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<WorkerId> for String {
    fn from(value: WorkerId) -> Self {
        value.as_str().to_string()
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkerId({})", self.as_str())
    }
}

/// A source's own handle for a worker (a pid and start time, a socket path, a remote id…).
///
/// Internal authority: it never leaves the process. It is not `Serialize`, and its `Debug`
/// prints `SourceKey(<redacted>)`. Sources build it with [`SourceKey::new`] and read it back
/// with [`SourceKey::as_str`]; it must be stable for the life of the worker, and it should be
/// unique across restarts of the source, since the registry derives the public id from it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey(Redacted<String>);

impl SourceKey {
    /// Wraps a source's handle.
    pub fn new(key: impl Into<String>) -> Self {
        SourceKey(Redacted(key.into()))
    }

    /// The handle, for the source that made it.
    pub fn as_str(&self) -> &str {
        &self.0 .0
    }
}

/// Issues worker ids from (runtime id, source key) with a keyed hash (BLAKE3 keyed mode).
///
/// The same key gives the same ids, so ids survive reconnects and, because the key is kept
/// in the state directory, restarts. Without the key an id can't be guessed, and it reveals
/// nothing of the source key.
#[derive(Clone)]
pub struct IdIssuer {
    key: [u8; 32],
}

/// The name of the key file in the state directory.
pub const KEY_FILE: &str = "id.key";

impl IdIssuer {
    /// An issuer with the given key.
    pub fn from_key(key: [u8; 32]) -> Self {
        IdIssuer { key }
    }

    /// An issuer with a fresh random key (ids will differ from any other run).
    pub fn ephemeral() -> Result<Self, RegistryError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(RegistryError::internal)?;
        Ok(IdIssuer { key })
    }

    /// Loads the key from `state_dir/id.key`, creating the directory (mode 0700) and the file
    /// (mode 0600, 32 random bytes) on first use. A key file of the wrong size is an error,
    /// never silently replaced: replacing it would change every worker id.
    ///
    /// The file appears whole or not at all: the key is written and synced to a temporary
    /// file first, then linked into place, which fails rather than replace a key that another
    /// process created meanwhile (that one is then used).
    pub fn load_or_create(state_dir: &Path) -> Result<Self, RegistryError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| RegistryError::internal(format!("create state dir: {e}")))?;
        let path = state_dir.join(KEY_FILE);
        if !path.exists() {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).map_err(RegistryError::internal)?;
            let mut nonce = [0u8; 8];
            getrandom::fill(&mut nonce).map_err(RegistryError::internal)?;
            let tmp = state_dir.join(format!(".{KEY_FILE}.{:016x}", u64::from_le_bytes(nonce)));
            let written = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut file| {
                    file.write_all(&key)?;
                    file.sync_all()
                });
            let linked = written.and_then(|()| fs::hard_link(&tmp, &path));
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    // Make the new name durable too.
                    if let Ok(dir) = fs::File::open(state_dir) {
                        let _ = dir.sync_all();
                    }
                    return Ok(IdIssuer { key });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(RegistryError::internal(format!("create id key: {e}"))),
            }
        }
        let mut bytes = Vec::new();
        fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| RegistryError::internal(format!("read id key: {e}")))?;
        let key = bytes.as_slice().try_into().map_err(|_| {
            RegistryError::internal(format!(
                "id key file {} holds {} bytes, want 32; refusing to replace it",
                path.display(),
                bytes.len()
            ))
        })?;
        Ok(IdIssuer { key })
    }

    /// The worker id for `key` in `runtime`.
    pub fn worker_id(&self, runtime: &RuntimeId, key: &SourceKey) -> WorkerId {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        // Length-prefixed, so ("a", "bc") and ("ab", "c") differ.
        hasher.update(&(runtime.as_str().len() as u64).to_le_bytes());
        hasher.update(runtime.as_str().as_bytes());
        hasher.update(key.as_str().as_bytes());
        WorkerId::from_digest(hasher.finalize().as_bytes())
    }
}

impl fmt::Debug for IdIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdIssuer(<key redacted>)")
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn runtime_names_are_validated() {
        for ok in ["local", "gpu-box", "a", "a1-2", &"a".repeat(63)] {
            assert!(RuntimeId::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Local",
            "1abc",
            "-a",
            "a_b",
            "a.b",
            "a b",
            &"a".repeat(64),
        ] {
            let err = RuntimeId::new(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_request", "{bad}");
        }
    }

    #[test]
    fn worker_ids_have_the_public_shape_and_parse_back() {
        let issuer = IdIssuer::from_key([7; 32]);
        let id = issuer.worker_id(&RuntimeId::new("local").unwrap(), &SourceKey::new("1"));
        let s = id.as_str();
        assert_eq!(s.len(), 28);
        assert!(s.starts_with("w_"));
        assert!(s[2..].bytes().all(|b| CROCKFORD.contains(&b)));
        assert_eq!(s.parse::<WorkerId>().unwrap(), id);
        for bad in [
            "",
            "w_",
            "x_0123456789ABCDEFGHJKMNPQRS",
            "w_0123456789abcdefghjkmnpqrs",
        ] {
            assert_eq!(
                bad.parse::<WorkerId>().unwrap_err().code(),
                "worker_not_found"
            );
        }
    }

    #[test]
    fn ids_depend_on_key_runtime_and_source_key() {
        let a = IdIssuer::from_key([1; 32]);
        let b = IdIssuer::from_key([2; 32]);
        let local = RuntimeId::new("local").unwrap();
        let other = RuntimeId::new("other").unwrap();
        let k = SourceKey::new("pid:4242");
        assert_eq!(a.worker_id(&local, &k), a.worker_id(&local, &k));
        assert_ne!(a.worker_id(&local, &k), b.worker_id(&local, &k));
        assert_ne!(a.worker_id(&local, &k), a.worker_id(&other, &k));
        assert_ne!(
            a.worker_id(&local, &k),
            a.worker_id(&local, &SourceKey::new("pid:4243"))
        );
        // The id says nothing of the key.
        assert!(!a.worker_id(&local, &k).as_str().contains("4242"));
    }

    #[test]
    fn key_file_is_created_private_and_reused_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = IdIssuer::load_or_create(&state).unwrap();
        let mode = fs::metadata(state.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = IdIssuer::load_or_create(&state).unwrap();
        let rt = RuntimeId::new("local").unwrap();
        let key = SourceKey::new("abc");
        assert_eq!(first.worker_id(&rt, &key), again.worker_id(&rt, &key));
        let other = IdIssuer::load_or_create(&dir.path().join("elsewhere")).unwrap();
        assert_ne!(first.worker_id(&rt, &key), other.worker_id(&rt, &key));
    }

    #[test]
    fn concurrent_first_starts_agree_on_one_key_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().to_path_buf();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let state = state.clone();
                std::thread::spawn(move || IdIssuer::load_or_create(&state).unwrap().key)
            })
            .collect();
        let keys: Vec<[u8; 32]> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(keys.iter().all(|k| k == &keys[0]));
        let names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![KEY_FILE.to_string()]);
    }

    #[test]
    fn a_damaged_key_file_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEY_FILE), b"short").unwrap();
        let err = IdIssuer::load_or_create(dir.path()).unwrap_err();
        assert_eq!(err.code(), "internal");
        assert_eq!(fs::read(dir.path().join(KEY_FILE)).unwrap(), b"short");
    }

    #[test]
    fn debug_of_authority_holders_is_redacted() {
        let key = SourceKey::new("/run/legacy/worker.sock");
        assert_eq!(format!("{key:?}"), "SourceKey(<redacted>)");
        let issuer = IdIssuer::from_key([9; 32]);
        assert!(!format!("{issuer:?}").contains('9'));
    }
}
