//! Secrets (API keys) as values that cannot leak by accident.
//!
//! Invariant: the only way to the raw value is [`SecretString::expose`]; `Debug`, `Display`
//! and `Serialize` print a fixed mask, so a key can sit inside config structs that are
//! logged, hashed into cache keys or written to reports.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A secret (API key). `Debug`, `Display` and `Serialize` print a fixed mask, so a key can
/// be carried inside config structs that are logged or written to reports without leaking.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub const MASK: &'static str = "***";

    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The raw value. Call this only where the secret leaves the process on purpose:
    /// the HTTP header of a provider request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretString({})", Self::MASK)
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::MASK)
    }
}

impl Serialize for SecretString {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(Self::MASK)
    }
}

impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(SecretString)
    }
}
