//! Capturing log lines to check the guide's phrases.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Log output of the current thread, kept in memory.
///
/// [`LogCapture::install`] sets a thread-local subscriber: use it in a `current_thread` tokio
/// test so that every task of the test logs into it.
///
/// `tracing` caches, per call site and for the whole process, whether anyone listens. While
/// only one subscriber exists, that answer comes from the default subscriber of whichever
/// thread reaches the call site first: a sibling test on a thread without a subscriber would
/// cache "never", and this capture would then miss the line. So `install` also sets, once, a
/// process-wide subscriber that listens to everything and keeps nothing.
#[derive(Debug, Clone, Default)]
pub struct LogCapture {
    buf: Arc<Mutex<Vec<u8>>>,
}

impl LogCapture {
    /// Starts capturing (debug level and up) until the guard is dropped.
    pub fn install() -> (Self, tracing::subscriber::DefaultGuard) {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            // Fails only when the process already has a global subscriber, which serves as well.
            let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
        });
        let capture = Self::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        // Call sites reached before this subscriber existed may have cached "disabled".
        tracing::callsite::rebuild_interest_cache();
        (capture, guard)
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock()).into_owned()
    }

    /// How many lines contain `phrase`.
    pub fn count(&self, phrase: &str) -> usize {
        self.text().lines().filter(|line| line.contains(phrase)).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.buf.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Write for LogCapture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::LogCapture;

    fn probe() {
        tracing::info!("probe line");
    }

    #[test]
    fn a_call_site_first_reached_on_a_thread_without_a_subscriber_is_still_captured() {
        let (logs, _guard) = LogCapture::install();
        // The call site registers on a thread that has no subscriber of its own.
        std::thread::spawn(probe).join().unwrap();
        probe();
        assert_eq!(logs.count("probe line"), 1, "{}", logs.text());
    }
}
