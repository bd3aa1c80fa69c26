//! TLS for the stores' connections: rustls with the ring provider, for PostgreSQL (sqlx:
//! `sslmode=require`, or `verify-ca`/`verify-full` with `sslrootcert=<CA file>` in
//! `DATABASE_URL`) and Redis (`rediss://` in `REDIS_URL`, `REDIS_CA_FILE`).
//!
//! When a server's certificate does not chain to the configured authority (or does not name
//! the host), the connection fails like an outage: the component runs degraded on its fallback
//! and [`mesh_health::tls_hint`] adds which setting to check to the one line that reports it.

pub use mesh_health::tls_hint;

/// Makes ring rustls's process-wide provider (the Redis client asks rustls for the default
/// one; a build with QUIC carries a second provider, and rustls then wants to be told).
/// Installing twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Checks that `pem` holds at least one certificate; the reason when not.
pub(crate) fn check_pem_certificates(pem: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("-----BEGIN CERTIFICATE-----") {
        Ok(())
    } else {
        Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in the file".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        assert!(check_pem_certificates(b"-----BEGIN CERTIFICATE-----\nx\n").is_ok());
        assert!(check_pem_certificates(b"not a certificate").is_err());
    }
}
