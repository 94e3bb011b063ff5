//! [`SafeName`]: the only way a name from outside (a workload, a volume) becomes a path component.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A string that is safe to use as a single path component under a directory we own.
///
/// Rules: 1 to [`SafeName::MAX_LEN`] bytes of `[A-Za-z0-9._-]`, starting with a letter, digit
/// or `_`. That excludes `/`, NUL, `.`, `..` and absolute paths by construction. Leading `.`
/// is refused because the [`crate::Store`] keeps its own temporary directories under hidden
/// names, which therefore can never collide with a checkpoint; leading `-` is refused so that a
/// name can never be taken for an option by a command-line tool it is handed to.
///
/// The length bound leaves room for the store's prefixes and suffixes within the kernel's
/// 255-byte `NAME_MAX`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SafeName(String);

impl SafeName {
    /// Longest accepted name, in bytes.
    pub const MAX_LEN: usize = 200;

    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        match Self::problem(&name) {
            None => Ok(Self(name)),
            Some(reason) => Err(Error::InvalidName { name, reason }),
        }
    }

    /// Whether `name` would be accepted by [`SafeName::new`].
    pub fn is_valid(name: &str) -> bool {
        Self::problem(name).is_none()
    }

    fn problem(name: &str) -> Option<&'static str> {
        let Some(first) = name.bytes().next() else {
            return Some("empty");
        };
        if name.len() > Self::MAX_LEN {
            return Some("longer than 200 bytes");
        }
        if !(first.is_ascii_alphanumeric() || first == b'_') {
            return Some("must start with a letter, a digit or '_'");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Some("may contain only letters, digits, '.', '_' and '-'");
        }
        None
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Wraps a string built by this crate from safe parts; checked again in debug builds.
    pub(crate) fn from_trusted(name: String) -> Self {
        debug_assert!(Self::is_valid(&name), "{name:?} is not a safe name");
        Self(name)
    }
}

impl TryFrom<String> for SafeName {
    type Error = Error;
    fn try_from(name: String) -> Result<Self> {
        Self::new(name)
    }
}

impl From<SafeName> for String {
    fn from(name: SafeName) -> String {
        name.0
    }
}

impl FromStr for SafeName {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self> {
        Self::new(name)
    }
}

impl fmt::Display for SafeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SafeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<Path> for SafeName {
    fn as_ref(&self) -> &Path {
        Path::new(&self.0)
    }
}
