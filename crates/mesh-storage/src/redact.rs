//! Connection URLs with their secrets hidden, for logs, errors, `Debug` and `--dump-config`.
//!
//! A `DATABASE_URL` or `REDIS_URL` can carry a secret in two places: the userinfo
//! (`postgres://user:password@host/db`, `redis://:password@host`, or a lone name that some
//! Redis clients take as the password) and query parameters (`?password=`, `?sslpassword=`,
//! `?token=`, ...). Both are replaced by [`REDACTED`].

use std::fmt;

/// What a hidden secret is shown as.
pub const REDACTED: &str = "<redacted>";

/// Query parameters whose value is hidden: a parameter is secret when its name, lower-cased
/// and without `_` or `-`, contains one of these (`password`, `sslpassword`, `pass`, `pwd`,
/// `token`, `auth_token`, `secret`, `client_secret`, `key`, `api_key`, `sslkey`, ...).
const SECRET_PARAMETER_PARTS: [&str; 7] =
    ["pass", "pwd", "token", "secret", "key", "auth", "credential"];

/// `url` with every secret replaced by [`REDACTED`]; the scheme, host, port, path and the
/// other query parameters stay readable.
///
/// The userinfo runs to the last `@` of the whole URL, not to the first `/`: operators paste
/// passwords holding `/`, `?`, `#` or `@` without percent-encoding them, and a URL parser reads
/// `postgres://u:12/34@h/db` as host `u`, port `12` and path `/34@h/db`, so the password would
/// be shown. The price of reading it this way is that a URL with an `@` in its query shows
/// `<redacted>` for its host too. Query parameter names are decoded with
/// [`url::form_urlencoded`] (`pass%77ord` is `password`). A fragment means nothing in these
/// URLs; when there is one (a `#` in a password), it is hidden as a whole.
///
/// ```
/// use mesh_storage::redact_url;
/// assert_eq!(redact_url("postgres://mesh:s3/cr@t@db:5432/mesh"), "postgres://mesh:<redacted>@db:5432/mesh");
/// assert_eq!(redact_url("redis://h:6379/0?password=pw&timeout=5"), "redis://h:6379/0?password=<redacted>&timeout=5");
/// ```
pub fn redact_url(url: &str) -> String {
    let (head, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        // `sqlite:file.db?...` and other forms without an authority: only the query matters.
        None => ("", url),
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(head);
    let rest = match (head.is_empty(), rest.rfind('@')) {
        (false, Some(at)) => {
            let userinfo = &rest[..at];
            match userinfo.split_once(':') {
                // The user name is not a secret; everything after the first ':' is.
                Some((user, _)) if !user.contains(['/', '?', '#']) => {
                    out.push_str(user);
                    out.push(':');
                }
                // A lone name is the password for some Redis clients (`redis://secret@host`).
                None if !head.starts_with("redis") => {
                    out.push_str(userinfo);
                    out.push('@');
                    return finish(&rest[at + 1..], out);
                }
                _ => {}
            }
            out.push_str(REDACTED);
            out.push('@');
            &rest[at + 1..]
        }
        _ => rest,
    };
    finish(rest, out)
}

/// Appends host, port, path and query of `rest` to `out`, hiding secret query parameters and
/// any fragment.
fn finish(rest: &str, mut out: String) -> String {
    let (before_fragment, fragment) = match rest.split_once('#') {
        Some((before, fragment)) => (before, Some(fragment)),
        None => (rest, None),
    };
    match before_fragment.split_once('?') {
        Some((base, query)) => {
            out.push_str(base);
            out.push('?');
            redact_query(query, &mut out);
        }
        None => out.push_str(before_fragment),
    }
    if fragment.is_some() {
        out.push('#');
        out.push_str(REDACTED);
    }
    out
}

/// Appends `query` to `out` with the values of secret parameters hidden; separators (`&`, `;`)
/// and the other parameters are kept as written.
fn redact_query(query: &str, out: &mut String) {
    let mut rest = query;
    loop {
        let end = rest.find(['&', ';']).unwrap_or(rest.len());
        let pair = &rest[..end];
        match pair.split_once('=') {
            Some((name, _value)) if is_secret_parameter(name) => {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
        if end == rest.len() {
            break;
        }
        out.push_str(&rest[end..=end]);
        rest = &rest[end + 1..];
    }
}

/// `true` when a query parameter's (percent-encoded) name names a secret.
fn is_secret_parameter(encoded_name: &str) -> bool {
    let decoded: String = url::form_urlencoded::parse(encoded_name.as_bytes())
        .map(|(k, v)| if v.is_empty() { k.into_owned() } else { format!("{k}={v}") })
        .collect();
    let name: String =
        decoded.chars().filter(|c| !matches!(c, '_' | '-')).flat_map(char::to_lowercase).collect();
    SECRET_PARAMETER_PARTS.iter().any(|part| name.contains(part))
}

/// A connection URL whose `Debug` and `Display` hide its secrets ([`redact_url`]); the URL
/// itself is read with [`SecretUrl::expose`] (or through `Deref<Target = str>`) where a driver
/// needs it. Configuration types hold URLs in it so that printing a configuration can never
/// leak a password.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its secrets, for the driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its secrets hidden.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl std::ops::Deref for SecretUrl {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        Self(url.to_owned())
    }
}

impl From<SecretUrl> for String {
    fn from(url: SecretUrl) -> Self {
        url.0
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn hides(url: &str, expected: &str, secret: &str) {
        let shown = redact_url(url);
        assert_eq!(shown, expected);
        assert!(!shown.contains(secret), "{shown} shows {secret}");
    }

    #[test]
    fn userinfo_passwords_of_any_characters_are_hidden() {
        hides("redis://:pw1@h:6379/0", "redis://:<redacted>@h:6379/0", "pw1");
        hides("rediss://user:pw2@h:6380", "rediss://user:<redacted>@h:6380", "pw2");
        hides("postgres://u:pw3@h/db", "postgres://u:<redacted>@h/db", "pw3");
        hides("postgresql://u:pw4@h:5432/db", "postgresql://u:<redacted>@h:5432/db", "pw4");
        // Characters a parser would take for the end of the authority.
        hides("postgres://u:12/secret5@h/db", "postgres://u:<redacted>@h/db", "secret5");
        hides("postgres://u:a?secret6@h/db", "postgres://u:<redacted>@h/db", "secret6");
        hides("postgres://u:a#secret7@h/db", "postgres://u:<redacted>@h/db", "secret7");
        hides("postgres://u:a@secret8@h/db", "postgres://u:<redacted>@h/db", "secret8");
        hides("postgres://u:a:secret9@h/db", "postgres://u:<redacted>@h/db", "secret9");
        hides("redis://secret10@h:6379", "redis://<redacted>@h:6379", "secret10");
        hides("postgres://u:%2Fsecret11@h/db", "postgres://u:<redacted>@h/db", "secret11");
    }

    #[test]
    fn secret_query_parameters_are_hidden() {
        for name in [
            "password",
            "PASSWORD",
            "pass",
            "pwd",
            "passwd",
            "sslpassword",
            "token",
            "auth_token",
            "secret",
            "client_secret",
            "key",
            "api_key",
            "apikey",
            "api-key",
            "sslkey",
            "pass%77ord",
        ] {
            hides(
                &format!("postgres://h/db?sslmode=require&{name}=s3cr3t&x=1"),
                &format!("postgres://h/db?sslmode=require&{name}=<redacted>&x=1"),
                "s3cr3t",
            );
        }
        hides("redis://h:6379/0?password=a/b", "redis://h:6379/0?password=<redacted>", "a/b");
        hides("rediss://h?db=0;password=pw", "rediss://h?db=0;password=<redacted>", "=pw");
        hides("sqlite:mesh.db?mode=rwc&key=k1", "sqlite:mesh.db?mode=rwc&key=<redacted>", "k1");
        hides(
            "sqlite://data/mesh.db?mode=rwc&password=pw#frag",
            "sqlite://data/mesh.db?mode=rwc&password=<redacted>#<redacted>",
            "pw",
        );
        // Both places at once.
        hides(
            "postgres://u:pw1@h/db?password=pw2",
            "postgres://u:<redacted>@h/db?password=<redacted>",
            "pw",
        );
    }

    #[test]
    fn urls_without_secrets_are_unchanged() {
        for url in [
            "postgres://h/db",
            "postgres://u@h/db?sslmode=require",
            "postgresql://user@h:5432/db",
            "redis://127.0.0.1:6379/0",
            "sqlite://data/mesh.db?mode=rwc",
            "sqlite::memory:",
            "postgres:///db?host=/var/run/postgresql",
            "",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn secret_url_never_prints_its_secret() {
        let url = SecretUrl::new("postgres://u:hunter2@h/db?token=t0k");
        for shown in [format!("{url:?}"), url.to_string(), format!("{:?}", Some(url.clone()))] {
            assert!(!shown.contains("hunter2") && !shown.contains("t0k"), "{shown}");
        }
        assert_eq!(url.expose(), "postgres://u:hunter2@h/db?token=t0k");
        assert_eq!(&*url, url.expose());
    }
}
