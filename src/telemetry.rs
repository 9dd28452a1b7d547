//! Logging setup: `tracing` to stderr, as text or JSON, filtered by `log.level` (or `RUST_LOG`).
//!
//! Every event is one line: in the text format, CR and LF inside field values (a CRM's HTML
//! error page, a value a client sent) are written as `\r` and `\n`, so no value can split a
//! line or forge one. Warnings that can repeat at the rate of events go through a [`RateLimit`].

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Installs the global subscriber once; later calls are no-ops (tests call it repeatedly).
pub fn init(cfg: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(OneLine(std::io::stderr));
    let _ = if cfg.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// A writer that keeps each formatted event on one line: the formatter hands it one event per
/// `write`; CR and every LF but the final one are escaped.
#[derive(Clone, Copy)]
pub struct OneLine<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for OneLine<M> {
    type Writer = OneLineWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        OneLineWriter(self.0.make_writer())
    }
}

pub struct OneLineWriter<W>(W);

impl<W: Write> Write for OneLineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        if !body.iter().any(|b| *b == b'\r' || *b == b'\n') {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut line = Vec::with_capacity(buf.len() + 16);
        for b in body {
            match b {
                b'\r' => line.extend_from_slice(b"\\r"),
                b'\n' => line.extend_from_slice(b"\\n"),
                b => line.push(*b),
            }
        }
        if body.len() < buf.len() {
            line.push(b'\n');
        }
        self.0.write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// `s` on one line, at most `max` bytes of it (cut on a character boundary, `…` marks the
/// cut): control characters are written as `\r`, `\n`, `\t` or `\u{..}`. For text that comes
/// from peers and ends up in logs and error messages.
pub fn one_line(s: &str, max: usize) -> String {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = String::with_capacity(cut + 8);
    for c in s[..cut].chars() {
        match c {
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    if cut < s.len() {
        out.push('…');
    }
    out
}

/// Lets a repeated warning through at most once per period; the ones held back are counted
/// and the next line let through says how many.
///
/// ```ignore
/// static QUEUE_FULL: RateLimit = RateLimit::new(Duration::from_secs(10));
/// if let Some(suppressed) = QUEUE_FULL.check() {
///     tracing::warn!(suppressed, "queue full");
/// }
/// ```
pub struct RateLimit {
    period: Duration,
    state: Mutex<Option<(Instant, u64)>>,
}

impl RateLimit {
    pub const fn new(period: Duration) -> RateLimit {
        RateLimit {
            period,
            state: Mutex::new(None),
        }
    }

    /// `Some(n)` when this occurrence is to be logged, `n` being how many were held back since
    /// the last one logged; `None` when it is to be held back.
    pub fn check(&self) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *state {
            Some((last, held)) if now.duration_since(*last) < self.period => {
                *held += 1;
                None
            }
            other => {
                let held = other.map_or(0, |(_, h)| h);
                *other = Some((now, 0));
                Some(held)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_escapes_controls_and_cuts_on_a_character_boundary() {
        assert_eq!(one_line("a\r\nb\tc\u{7}", 100), "a\\r\\nb\\tc\\u{7}");
        assert_eq!(one_line("ééé", 3), "é…");
        assert_eq!(one_line("plain", 5), "plain");
    }

    #[test]
    fn the_writer_keeps_an_event_on_one_line() {
        let mut out = Vec::new();
        {
            let mut w = OneLineWriter(&mut out);
            w.write_all(b"ERROR x: body=<html>\r\n<p>\n2026 INFO forged\n")
                .unwrap();
            w.write_all(b"INFO next\n").unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ERROR x: body=<html>\\r\\n<p>\\n2026 INFO forged\nINFO next\n"
        );
    }

    #[test]
    fn a_rate_limit_lets_one_through_per_period_and_counts_the_rest() {
        let limit = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(limit.check(), Some(0));
        assert_eq!(limit.check(), None);
        assert_eq!(limit.check(), None);
        let zero = RateLimit::new(Duration::ZERO);
        assert_eq!(zero.check(), Some(0));
        assert_eq!(zero.check(), Some(0));
    }
}
