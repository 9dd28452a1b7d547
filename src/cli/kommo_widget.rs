//! `pbxgate kommo widget`: the widget's archive to upload into the Kommo integration.
//! (Interface; the implementation follows.)

use std::path::Path;

/// Writes the widget's zip to `out`; returns what to print.
#[allow(dead_code)]
pub fn write(_out: &Path, _public_url: &str) -> Result<String, String> {
    Err("not yet".into())
}
