//! Conversion to mp3 through an external encoder (`lame`, `ffmpeg`), from `records.convert_command`.
//!
//! The encoder writes a hidden temporary file with an unguessable name next to the original; only
//! a complete, non-empty output that sniffs as mp3 is synced to disk and renamed into place
//! (`<original name>.mp3`, the directory synced too), so a converted copy either exists whole or
//! not at all, also after a power loss. An encoder that outlives `records.convert_timeout` is
//! killed with its whole process group. One conversion runs at a time (the PBX host's cores
//! belong to Asterisk first). Temporary files a crash left behind are deleted after an hour.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use rand::RngCore;
use tokio::io::AsyncReadExt;

use super::sniff::{self, Format};

/// How much of the encoder's stderr is kept for the log line.
const STDERR_TAIL: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("cannot start the encoder {program:?}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("the encoder failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("the encoder did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the encoder's output is not mp3 ({0})")]
    BadOutput(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where the converted copy of `original` is cached: `<dir>/<file name>.mp3`.
pub fn converted_path(original: &Path) -> PathBuf {
    let mut name = original.file_name().unwrap_or_default().to_os_string();
    name.push(".mp3");
    original.with_file_name(name)
}

/// Suffix of the temporary outputs.
const PARTIAL_SUFFIX: &str = ".part.mp3";
/// Temporary outputs older than this are left over from a crash: no conversion runs this long.
const PARTIAL_MAX_AGE: Duration = Duration::from_secs(3600);

/// The temporary output of a conversion in progress: hidden, with 64 random bits in its name so
/// that nobody else with write access to the directory can prepare it (a symlink the encoder
/// would write through), still ending in `.mp3` so that ffmpeg picks the format from the name.
fn partial_path(original: &Path) -> PathBuf {
    let mut random = [0u8; 8];
    rand::rng().fill_bytes(&mut random);
    let random: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let mut name = std::ffi::OsString::from(".");
    name.push(original.file_name().unwrap_or_default());
    name.push(format!(".{random}{PARTIAL_SUFFIX}"));
    original.with_file_name(name)
}

/// Deletes temporary outputs older than [`PARTIAL_MAX_AGE`] (a crash during a conversion) from
/// `dir`, looking at most once an hour per directory.
fn remove_stale_partials(dir: &Path) {
    static SWEPT: Mutex<Option<HashMap<PathBuf, Instant>>> = Mutex::new(None);
    {
        let mut swept = SWEPT.lock().unwrap_or_else(|p| p.into_inner());
        let swept = swept.get_or_insert_with(HashMap::new);
        let now = Instant::now();
        if swept
            .get(dir)
            .is_some_and(|at| now.duration_since(*at) < PARTIAL_MAX_AGE)
        {
            return;
        }
        swept.retain(|_, at| now.duration_since(*at) < PARTIAL_MAX_AGE);
        swept.insert(dir.to_path_buf(), now);
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if !(name.starts_with('.') && name.ends_with(PARTIAL_SUFFIX)) {
            continue;
        }
        // Never follows a symlink: only our own regular files.
        let stale = entry.metadata().is_ok_and(|m| {
            m.is_file()
                && m.modified()
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age >= PARTIAL_MAX_AGE)
        });
        if stale {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!("a conversion's leftover temporary file deleted"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot delete a conversion's leftover temporary file")
                }
            }
        }
    }
}

/// Makes the output durable before it is renamed into place.
async fn sync_file(path: &Path) -> std::io::Result<()> {
    tokio::fs::File::open(path).await?.sync_all().await
}

/// Makes a rename in `dir` durable. File systems that cannot sync a directory say so with
/// `EINVAL`: nothing more can be done there.
async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    match tokio::fs::File::open(dir).await?.sync_all().await {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        result => result,
    }
}

/// Runs the encoder on `input`, leaving `converted_path(input)` on success.
pub async fn to_mp3(
    command: &[String],
    input: &Path,
    timeout: Duration,
) -> Result<PathBuf, ConvertError> {
    let output = converted_path(input);
    let partial = partial_path(input);
    let dir = input.parent().unwrap_or(Path::new(".")).to_path_buf();
    let sweep = dir.clone();
    let _ = tokio::task::spawn_blocking(move || remove_stale_partials(&sweep)).await;
    let result = run_encoder(command, input, &partial, timeout).await;
    let checked = match result {
        Ok(()) => check_output(&partial).await,
        Err(e) => Err(e),
    };
    let synced = match checked {
        Ok(()) => sync_file(&partial).await.map_err(ConvertError::from),
        Err(e) => Err(e),
    };
    let renamed = match synced {
        Ok(()) => tokio::fs::rename(&partial, &output)
            .await
            .map_err(ConvertError::from),
        Err(e) => Err(e),
    };
    if let Err(e) = renamed {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(e);
    }
    // The link made next is flushed to the store: the name it points at must be on disk first.
    if let Err(e) = sync_dir(&dir).await {
        let _ = tokio::fs::remove_file(&output).await;
        return Err(e.into());
    }
    Ok(output)
}

async fn run_encoder(
    command: &[String],
    input: &Path,
    output: &Path,
    timeout: Duration,
) -> Result<(), ConvertError> {
    let argv: Vec<std::ffi::OsString> = command
        .iter()
        .map(|arg| {
            arg.replace("{input}", &input.to_string_lossy())
                .replace("{output}", &output.to_string_lossy())
                .into()
        })
        .collect();
    let program = command.first().cloned().unwrap_or_default();
    if argv.is_empty() {
        return Err(ConvertError::Spawn {
            program,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        });
    }
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|source| ConvertError::Spawn {
        program: program.clone(),
        source,
    })?;
    let mut stderr = child.stderr.take();
    let collect = async move {
        let mut text = Vec::new();
        if let Some(s) = stderr.as_mut() {
            // Read to the end (a full pipe would stall the encoder), keep the tail.
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                text.extend_from_slice(&buf[..n]);
                if text.len() > 4 * STDERR_TAIL {
                    text.drain(..text.len() - STDERR_TAIL);
                }
            }
        }
        text
    };
    let run = async { tokio::join!(child.wait(), collect) };
    match tokio::time::timeout(timeout, run).await {
        Ok((Ok(status), stderr)) if status.success() => {
            let _ = stderr;
            Ok(())
        }
        Ok((Ok(status), stderr)) => {
            let tail = String::from_utf8_lossy(&stderr[stderr.len().saturating_sub(STDERR_TAIL)..])
                .trim()
                .to_string();
            Err(ConvertError::Failed {
                status: status.to_string(),
                stderr: tail,
            })
        }
        Ok((Err(e), _)) => Err(ConvertError::Io(e)),
        Err(_) => {
            kill_group(&mut child).await;
            Err(ConvertError::Timeout(timeout))
        }
    }
}

/// Kills the encoder and anything it started (`sh -c`, ffmpeg's helpers), then reaps it.
async fn kill_group(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a negative pid signals the process group we created for the child.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill().await;
}

async fn check_output(path: &Path) -> Result<(), ConvertError> {
    let path = path.to_path_buf();
    let format = tokio::task::spawn_blocking(move || sniff::sniff_file(&path))
        .await
        .map_err(|e| ConvertError::BadOutput(e.to_string()))?
        .map_err(|e| ConvertError::BadOutput(format!("cannot read it: {e}")))?;
    match format {
        Format::Mp3 => Ok(()),
        other => Err(ConvertError::BadOutput(format!("looks like {other:?}"))),
    }
}

/// Masks runs of 6 or more digits (phone numbers in file names echoed by an encoder) for logs.
pub fn mask_digit_runs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 6 {
            out.push_str(&crate::base::ident::mask_number(run));
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_encoder_messages_are_masked() {
        assert_eq!(
            mask_digit_runs("cannot open /m/in-79991234567-101.wav: 2 errors"),
            "cannot open /m/in-7999*****67-101.wav: 2 errors"
        );
    }

    #[test]
    fn the_cached_copy_sits_next_to_the_original() {
        assert_eq!(
            converted_path(Path::new("/var/spool/asterisk/monitor/2026/in-1.wav")),
            PathBuf::from("/var/spool/asterisk/monitor/2026/in-1.wav.mp3")
        );
        let partial = partial_path(Path::new("/m/in-1.WAV"));
        let name = partial.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(".in-1.WAV.") && name.ends_with(".part.mp3"),
            "{name}"
        );
        assert_eq!(partial.parent(), Some(Path::new("/m")));
        // Not predictable: 16 random hex digits, different every time.
        let random = &name[".in-1.WAV.".len()..name.len() - PARTIAL_SUFFIX.len()];
        assert_eq!(random.len(), 16, "{name}");
        assert!(random.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
        assert_ne!(partial_path(Path::new("/m/in-1.WAV")), partial);
    }

    #[test]
    fn only_old_leftover_partials_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        let make = |name: &str, old: bool| {
            let path = dir.join(name);
            std::fs::write(&path, b"x").unwrap();
            if old {
                std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_modified(two_hours_ago)
                    .unwrap();
            }
            path
        };
        let stale = make(".in-1.wav.0123456789abcdef.part.mp3", true);
        let running = make(".in-2.wav.0123456789abcdef.part.mp3", false);
        let copy = make("in-3.wav.mp3", true);
        let other = make(".in-4.part.mp3.keep", true);
        let target = make("target.wav", true);
        let link = dir.join(".in-5.wav.0123456789abcdef.part.mp3");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        remove_stale_partials(dir);
        assert!(!stale.exists());
        for kept in [&running, &copy, &other, &target] {
            assert!(kept.exists(), "{}", kept.display());
        }
        assert!(link.symlink_metadata().is_ok(), "a symlink is not ours");
        // At most once an hour per directory.
        let again = make(".in-6.wav.0123456789abcdef.part.mp3", true);
        remove_stale_partials(dir);
        assert!(again.exists());
    }
}
