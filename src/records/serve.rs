//! The recording behind a link, made ready to be sent: the token checked, the file chosen (the
//! mp3 copy, or the original when the copy cannot be served), opened without following a
//! symlink swapped in since the check, sniffed for its format, with what conditional and range
//! requests need (an opaque strong validator, the mtime when an HTTP date can express it).
//! Also the `Range` header's grammar. The HTTP handler turns
//! this into a response; nothing here knows the server.

use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::sniff::{self, Format, SNIFF_LEN};
use super::{LinkError, Records};

/// Why a recording is not sent.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The link is malformed, forged, unknown or expired, or the store failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The link is genuine but no servable file is behind it.
    #[error("the recording is not available")]
    Unavailable,
    /// A well-formed single range that selects nothing of the file.
    #[error("range not satisfiable: the recording has {len} bytes")]
    RangeNotSatisfiable { len: u64 },
}

/// An open recording, ready to be answered.
#[derive(Debug)]
pub struct Opened {
    pub file: std::fs::File,
    pub len: u64,
    /// The file's mtime, when an HTTP date can express it (not before 1970, before year 10000):
    /// otherwise there is no `Last-Modified` and no date-based validation.
    pub modified: Option<SystemTime>,
    /// A strong validator (the value of an `ETag`, unquoted): changes whenever the file is
    /// replaced or rewritten.
    pub etag: String,
    pub format: Format,
    /// The name to offer (the entry's, with the extension of the format actually sent).
    pub filename: String,
}

/// Blocking: checks the token, opens the file (refusing a symlink or a FIFO swapped in since the
/// check) and sniffs its format. A converted copy that turns out empty or not mp3 is passed over
/// for the original.
pub fn open(records: &Records, name: &str, now: u64) -> Result<Opened, ServeError> {
    let resolved = records.resolve(name, now)?;
    let found = match &resolved.original {
        Some(original) => match open_checked(&resolved.file) {
            Some(copy) if copy.len > 0 && copy.format == Format::Mp3 => Some(copy),
            _ => {
                tracing::warn!(call = %resolved.entry.call_id,
                    "the mp3 copy of the recording cannot be served (unreadable, empty or not mp3); the original is");
                open_checked(original)
            }
        },
        None => open_checked(&resolved.file),
    };
    let Found {
        file,
        len,
        modified,
        etag,
        format,
    } = found.ok_or(ServeError::Unavailable)?;
    let filename = match (resolved.entry.filename.rsplit_once('.'), format) {
        (Some((stem, _)), f) if f != Format::Unknown => format!("{stem}.{}", f.ext()),
        _ => resolved.entry.filename.clone(),
    };
    Ok(Opened {
        file,
        len,
        modified,
        etag,
        format,
        filename,
    })
}

/// A recording file, open and sniffed.
struct Found {
    file: std::fs::File,
    len: u64,
    modified: Option<SystemTime>,
    etag: String,
    format: Format,
}

/// Opens the regular file at the canonical `path` (no symlink, no FIFO, no other path to it) and
/// sniffs it; None if it is not available.
fn open_checked(path: &Path) -> Option<Found> {
    let file = super::open_regular(path).ok()?;
    if !is_open_at(&file, path) {
        return None;
    }
    let meta = file.metadata().ok()?;
    let len = meta.len();
    let modified = meta.modified().ok().filter(|&t| http_date_can_express(t));
    let mut head = [0u8; SNIFF_LEN];
    let mut got = 0;
    while got < head.len() {
        match file.read_at(&mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let format = sniff::sniff(&head[..got], len);
    // Changes whenever the file is replaced or rewritten.
    let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    let sign = if mtime_ns < 0 { "-" } else { "" };
    let etag = format!(
        "{:x}-{:x}-{sign}{:x}",
        meta.ino(),
        len,
        mtime_ns.unsigned_abs()
    );
    Some(Found {
        file,
        len,
        modified,
        etag,
        format,
    })
}

/// Whether `file` was opened at the canonical `path`: `O_NOFOLLOW` guards only the last
/// component, so a directory above it swapped for a symlink since the check shows up here, in
/// the kernel's name for the descriptor. Without a readable `/proc` this cannot be told, and the
/// earlier checks stand alone.
fn is_open_at(file: &std::fs::File, path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    match std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
        Ok(actual) => actual == path,
        Err(_) => true,
    }
}

/// The last second an HTTP date can name (9999-12-31 23:59:59 UTC); formatting a later time, or
/// one before 1970, panics.
pub const LAST_HTTP_DATE_SECS: u64 = 253_402_300_799;

/// Whether `t` can be sent as an HTTP date.
pub fn http_date_can_express(t: SystemTime) -> bool {
    t.duration_since(UNIX_EPOCH)
        .is_ok_and(|d| d.as_secs() <= LAST_HTTP_DATE_SECS)
}

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// No usable range (absent, malformed, several ranges, another unit): the whole file.
    Full,
    /// Bytes `start..end` (end exclusive).
    Partial(u64, u64),
    /// A well-formed single range that selects nothing: 416.
    Unsatisfiable,
}

/// Parses `bytes=a-b`, `bytes=a-` and `bytes=-n` (RFC 9110 §14.1.2); anything else is ignored.
pub fn parse_range(value: &str, len: u64) -> Range {
    let Some((unit, spec)) = value.trim().split_once('=') else {
        return Range::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return Range::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Range::Full;
    };
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().unwrap_or(u64::MAX))
    };
    match (first.trim().is_empty(), number(first), number(last)) {
        // Suffix: the last n bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                Range::Unsatisfiable
            } else {
                Range::Partial(len - n.min(len), len)
            }
        }
        (false, Some(start), None) if last.trim().is_empty() => {
            if start >= len {
                Range::Unsatisfiable
            } else {
                Range::Partial(start, len)
            }
        }
        (false, Some(start), Some(end)) if start <= end => {
            if start >= len {
                Range::Unsatisfiable
            } else {
                Range::Partial(start, end.min(len - 1) + 1)
            }
        }
        _ => Range::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_first_middle_suffix_open_and_odd() {
        assert_eq!(parse_range("bytes=0-99", 1000), Range::Partial(0, 100));
        assert_eq!(parse_range("bytes=500-599", 1000), Range::Partial(500, 600));
        assert_eq!(parse_range("bytes=900-", 1000), Range::Partial(900, 1000));
        assert_eq!(parse_range("bytes=-100", 1000), Range::Partial(900, 1000));
        assert_eq!(parse_range("bytes=-5000", 1000), Range::Partial(0, 1000));
        assert_eq!(
            parse_range("bytes=990-5000", 1000),
            Range::Partial(990, 1000)
        );
        assert_eq!(parse_range("BYTES = 1-1", 10), Range::Partial(1, 2));
        assert_eq!(parse_range("bytes=1000-", 1000), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=1000-1001", 1000), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 1000), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Range::Unsatisfiable);
        // Ignored: answered with the whole file.
        for odd in [
            "bytes=5-2",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=a-b",
            "bytes=-",
            "bytes",
            "",
        ] {
            assert_eq!(parse_range(odd, 1000), Range::Full, "{odd}");
        }
        assert_eq!(
            parse_range("bytes=0-99999999999999999999999", 10),
            Range::Partial(0, 10)
        );
    }

    #[test]
    fn a_file_reached_through_a_directory_swapped_for_a_symlink_is_refused() {
        use std::os::fd::AsRawFd;
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir(base.join("monitor")).unwrap();
        std::fs::create_dir(base.join("outside")).unwrap();
        std::fs::write(base.join("monitor/a.wav"), b"RIFF").unwrap();
        std::fs::write(base.join("outside/a.wav"), b"RIFF").unwrap();
        // Checked (canonical), then the directory is swapped before the open.
        let checked = std::fs::canonicalize(base.join("monitor/a.wav")).unwrap();
        let direct = crate::records::open_regular(&checked).unwrap();
        assert!(is_open_at(&direct, &checked));
        assert!(open_checked(&checked).is_some());
        std::fs::rename(base.join("monitor"), base.join("old")).unwrap();
        std::os::unix::fs::symlink(base.join("outside"), base.join("monitor")).unwrap();
        let swapped = crate::records::open_regular(&checked).unwrap();
        let proc_readable =
            std::fs::read_link(format!("/proc/self/fd/{}", swapped.as_raw_fd())).is_ok();
        assert_eq!(is_open_at(&swapped, &checked), !proc_readable);
        if proc_readable {
            assert!(open_checked(&checked).is_none());
        }
    }
}
