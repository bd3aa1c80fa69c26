//! The Birdeye API key, kept out of every log line, `Debug` output and error message.

use std::fmt;

/// A Birdeye API key. Its `Debug` output is redacted and it has no `Display`, so it cannot end
/// up in a log line or an error message by accident; [`ApiKey::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key, trimming surrounding whitespace (a common copy-and-paste accident).
    pub fn new(key: impl Into<String>) -> Self {
        let key = key.into();
        let trimmed = key.trim();
        if trimmed.len() == key.len() { Self(key) } else { Self(trimmed.to_owned()) }
    }

    /// The key itself, for the `X-API-KEY` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `true` when the key is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl From<String> for ApiKey {
    fn from(key: String) -> Self {
        Self::new(key)
    }
}

impl From<&str> for ApiKey {
    fn from(key: &str) -> Self {
        Self::new(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let key = ApiKey::new("  sk-very-secret-123 ");
        assert_eq!(key.expose(), "sk-very-secret-123");
        let debug = format!("{key:?} {:?}", Some(&key));
        assert!(!debug.contains("secret"), "{debug}");
        assert!(debug.contains("redacted"));
    }
}
