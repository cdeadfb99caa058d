//! The node credential kept on disk, so an agent restart (or a node
//! reboot) registers again with it instead of the join token.
//!
//! The control plane issues a node credential when a node joins with a
//! token and stores only its hash (docs/decisions.md §29). Kept in memory
//! alone, it was lost with the agent process, so every restart spent the
//! join token again and tokens needed unlimited uses. With a credential
//! file the token is needed once, at the first join.
//!
//! Invariants:
//! - the file holds the secret and nothing else, is written whole (a
//!   temporary file in the same directory, fsynced, renamed over the old
//!   one, the directory fsynced) and is readable by its owner only;
//! - a missing file is no credential; an unreadable or malformed one is an
//!   error naming the file, never silently ignored (the operator must
//!   know why the agent falls back to its token).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use basalt_api::TokenSecret;

/// Reading or writing the credential file failed.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The file could not be read or written.
    #[error("node credential file {path}: {action}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The file does not hold a credential.
    #[error("node credential file {path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Where the agent keeps its node credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialFile {
    path: PathBuf,
}

/// Longest credential accepted from the file (the control plane issues
/// far shorter ones; a larger file is not ours).
const MAX_LEN: usize = 1024;

impl CredentialFile {
    /// The credential file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> CredentialFile {
        CredentialFile { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored credential; `None` when there is no file yet.
    pub fn load(&self) -> Result<Option<TokenSecret>, CredentialError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(self.io("reading", source)),
        };
        let malformed = |reason: &str| CredentialError::Malformed {
            path: self.path.clone(),
            reason: reason.to_owned(),
        };
        if bytes.len() > MAX_LEN {
            return Err(malformed("larger than a credential"));
        }
        let text = String::from_utf8(bytes).map_err(|_| malformed("not UTF-8 text"))?;
        let secret = text.trim();
        if secret.is_empty() {
            return Err(malformed("empty"));
        }
        if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(malformed("more than one word"));
        }
        Ok(Some(TokenSecret::new(secret)))
    }

    /// Replaces the stored credential with `credential`, atomically, with
    /// mode 0600; creates the parent directory (mode 0700) when missing.
    pub fn store(&self, credential: &TokenSecret) -> Result<(), CredentialError> {
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| self.io("creating its directory", e))?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| self.io("creating the temporary file", e))?;
        file.write_all(credential.expose().as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all())
            .map_err(|e| self.io("writing", e))?;
        fs::rename(&tmp, &self.path).map_err(|e| self.io("renaming into place", e))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io("syncing its directory", e))?;
        Ok(())
    }

    fn io(&self, action: &'static str, source: io::Error) -> CredentialError {
        CredentialError::Io {
            path: self.path.clone(),
            action,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "basalt-credential-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn stores_and_loads_with_owner_only_mode() {
        let dir = temp_dir();
        let file = CredentialFile::new(dir.join("state/node-credential"));
        assert_eq!(file.load().unwrap(), None);
        file.store(&TokenSecret::new("n1.s3cret")).unwrap();
        assert_eq!(file.load().unwrap().unwrap().expose(), "n1.s3cret");
        let mode = fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Replacing keeps one file and the new secret only.
        file.store(&TokenSecret::new("n1.other")).unwrap();
        assert_eq!(file.load().unwrap().unwrap().expose(), "n1.other");
        let names: Vec<_> = fs::read_dir(dir.join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("node-credential")]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_malformed_file_is_an_error_naming_it() {
        let dir = temp_dir();
        let path = dir.join("cred");
        let file = CredentialFile::new(&path);
        for (content, reason) in [
            (&b""[..], "empty"),
            (&b" \n"[..], "empty"),
            (&b"two words"[..], "more than one word"),
            (&[0xff, 0xfe][..], "not UTF-8"),
        ] {
            fs::write(&path, content).unwrap();
            let err = file.load().unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains(reason), "{err}");
        }
        fs::write(&path, vec![b'a'; MAX_LEN + 1]).unwrap();
        assert!(file.load().is_err());
        fs::remove_dir_all(dir).unwrap();
    }
}
