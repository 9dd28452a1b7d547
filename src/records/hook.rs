//! `process_record_file_path`: called once per call, when its recording is found and before its
//! link is made. Input: `{"path": "<the file found, absolute>", "call_full": {...},
//! "call_stage": "call_ended", "external_id": "..."}`; the hook may return `{"path": "..."}`,
//! absolute or relative to `records.dir`. The answer is used only if it resolves (symlinks
//! followed) to a regular file inside `records.dir` that holds sound; otherwise, and
//! when the hook fails, the file found stays, with a warn line naming the reason. The choice is
//! stored with the link (and covered by its MAC): the hook is not asked again for the call.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::sniff;
use crate::hooks::FieldKind;

pub const PROCESS_RECORD_FILE_PATH: &str = "process_record_file_path";

/// What the hook may return.
pub const FIELDS: &[(&str, FieldKind)] = &[("path", FieldKind::String)];

/// The point's input for a call whose recording is `found`.
pub fn input(found: &Path, call_full: Value, external_id: &str) -> Value {
    json!({
        "path": found.to_string_lossy(),
        "call_full": call_full,
        "call_stage": "call_ended",
        "external_id": external_id,
    })
}

/// Why a path a hook answered is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the path is empty")]
    Empty,
    #[error("the path does not exist or cannot be resolved")]
    Missing,
    #[error("the path resolves outside records.dir")]
    Outside,
    #[error("the path is not a regular file")]
    NotAFile,
    #[error("the path is not UTF-8")]
    NotUtf8,
    #[error("the file holds no sound (empty, or a WAV header only)")]
    NoSound,
}

/// The file a hook's `path` names, canonical (symlinks resolved), checked: a regular file
/// inside `dir` (itself canonical) that holds sound, like the recordings linked without a hook.
pub fn check(dir: &Path, answered: &str) -> Result<PathBuf, Refused> {
    if answered.trim().is_empty() {
        return Err(Refused::Empty);
    }
    if answered.contains('\0') {
        return Err(Refused::Missing);
    }
    let canonical = std::fs::canonicalize(dir.join(answered)).map_err(|_| Refused::Missing)?;
    if !canonical.starts_with(dir) {
        return Err(Refused::Outside);
    }
    if !canonical.is_file() {
        return Err(Refused::NotAFile);
    }
    if canonical.to_str().is_none() {
        return Err(Refused::NotUtf8);
    }
    // As for the file found: opened as a regular file (no FIFO swapped in), with sound in it.
    if !sniff::holds_audio(&canonical) {
        return Err(Refused::NoSound);
    }
    Ok(canonical)
}

/// The file a call's link serves given what the hook changed (`data`): the hook's if it passes
/// [`check`], else `found` (with the reason, for the log).
pub fn decide(
    dir: &Path,
    found: &Path,
    data: &Map<String, Value>,
) -> (PathBuf, Option<(String, Refused)>) {
    let Some(answered) = data.get("path").and_then(Value::as_str) else {
        return (found.to_path_buf(), None);
    };
    match check(dir, answered) {
        Ok(path) => (path, None),
        Err(why) => (found.to_path_buf(), Some((answered.to_string(), why))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::sniff::samples::wav_header;

    fn sound() -> Vec<u8> {
        let mut data = wav_header(1, 100);
        data.resize(144, 1);
        data
    }

    #[test]
    fn only_a_file_with_sound_inside_the_directory_passes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let dir = root.join("monitor");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.wav"), sound()).unwrap();
        std::fs::write(dir.join("sub/b.wav"), sound()).unwrap();
        std::fs::write(dir.join("empty.wav"), wav_header(1, 0)).unwrap();
        std::fs::write(root.join("outside.wav"), sound()).unwrap();
        std::os::unix::fs::symlink(root.join("outside.wav"), dir.join("out.wav")).unwrap();
        std::os::unix::fs::symlink(dir.join("sub/b.wav"), dir.join("in.wav")).unwrap();

        assert_eq!(check(&dir, "a.wav"), Ok(dir.join("a.wav")));
        let absolute = dir.join("sub/b.wav").display().to_string();
        assert_eq!(check(&dir, &absolute), Ok(dir.join("sub/b.wav")));
        assert_eq!(check(&dir, "sub/../a.wav"), Ok(dir.join("a.wav")));
        // A symlink that stays inside resolves to its target.
        assert_eq!(check(&dir, "in.wav"), Ok(dir.join("sub/b.wav")));

        let up = "../".repeat(dir.components().count());
        for (answer, why) in [
            (format!("{up}etc/passwd"), Refused::Outside),
            ("/etc/passwd".to_string(), Refused::Outside),
            ("../outside.wav".to_string(), Refused::Outside),
            (
                root.join("outside.wav").display().to_string(),
                Refused::Outside,
            ),
            ("out.wav".to_string(), Refused::Outside),
            ("sub".to_string(), Refused::NotAFile),
            (".".to_string(), Refused::NotAFile),
            ("missing.wav".to_string(), Refused::Missing),
            ("a.wav\0".to_string(), Refused::Missing),
            ("  ".to_string(), Refused::Empty),
            ("empty.wav".to_string(), Refused::NoSound),
        ] {
            assert_eq!(check(&dir, &answer), Err(why), "{answer:?}");
        }
    }

    #[test]
    fn without_a_path_in_the_answer_or_with_a_refused_one_the_file_found_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(tmp.path()).unwrap();
        let found = dir.join("found.wav");
        std::fs::write(&found, sound()).unwrap();
        assert_eq!(decide(&dir, &found, &Map::new()), (found.clone(), None));
        let mut data = Map::new();
        data.insert("path".into(), "/etc/passwd".into());
        assert_eq!(
            decide(&dir, &found, &data),
            (found, Some(("/etc/passwd".to_string(), Refused::Outside)))
        );
    }
}
