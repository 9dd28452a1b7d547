//! `pbxgate kommo widget`: the widget's archive to upload into the Kommo integration (its
//! "Widget" tab). The files are `static/kommo-widget/`, built into the binary, at the root of
//! the zip as Kommo wants them; `script.js` gets pbxgate's address (`http.public_url`), which
//! the widget uses while its own setting `pbxgate_url` is empty.

use std::io::Write;
use std::path::Path;

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

/// The line of `script.js` that carries the address.
const BAKED_LINE: &str = "var BAKED_URL = '';";

const SCRIPT: &str = include_str!("../../static/kommo-widget/script.js");

/// The archive's files other than `script.js`, by their path in it.
const FILES: &[(&str, &[u8])] = &[
    (
        "manifest.json",
        include_bytes!("../../static/kommo-widget/manifest.json"),
    ),
    (
        "i18n/en.json",
        include_bytes!("../../static/kommo-widget/i18n/en.json"),
    ),
    (
        "i18n/ru.json",
        include_bytes!("../../static/kommo-widget/i18n/ru.json"),
    ),
    (
        "images/logo.png",
        include_bytes!("../../static/kommo-widget/images/logo.png"),
    ),
    (
        "images/logo_min.png",
        include_bytes!("../../static/kommo-widget/images/logo_min.png"),
    ),
    (
        "images/logo_small.png",
        include_bytes!("../../static/kommo-widget/images/logo_small.png"),
    ),
    (
        "images/logo_medium.png",
        include_bytes!("../../static/kommo-widget/images/logo_medium.png"),
    ),
    (
        "images/logo_main.png",
        include_bytes!("../../static/kommo-widget/images/logo_main.png"),
    ),
];

/// pbxgate's address as the widget's browser reaches it: an http(s) URL without a path.
fn address(public_url: &str) -> Result<String, String> {
    let trimmed = public_url.trim().trim_end_matches('/');
    let url = url::Url::parse(trimmed)
        .map_err(|e| format!("http.public_url {trimmed:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "http.public_url {trimmed:?} must be an http(s) address"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "http.public_url {trimmed:?} must not carry a query or fragment"
        ));
    }
    Ok(trimmed.to_string())
}

/// `script.js` with the address written in.
fn script(address: &str) -> Result<String, String> {
    if !SCRIPT.contains(BAKED_LINE) {
        return Err("the widget's script has no place for the address".into());
    }
    // A JSON string is a valid JavaScript string literal.
    let literal = serde_json::to_string(address).map_err(|e| e.to_string())?;
    Ok(SCRIPT.replacen(BAKED_LINE, &format!("var BAKED_URL = {literal};"), 1))
}

/// The archive's bytes.
fn archive(address: &str) -> Result<Vec<u8>, String> {
    let script = script(address)?;
    let mut zip = ZipWriter::new(std::io::Cursor::new(Vec::new()));
    // Stored: the images are compressed already and the rest is a few KiB.
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .unix_permissions(0o644);
    let files = std::iter::once(("script.js", script.as_bytes()))
        .chain(FILES.iter().map(|(n, b)| (*n, *b)));
    for (name, bytes) in files {
        zip.start_file(name, options)
            .and_then(|()| zip.write_all(bytes).map_err(Into::into))
            .map_err(|e| format!("{name}: {e}"))?;
    }
    let cursor = zip.finish().map_err(|e| e.to_string())?;
    Ok(cursor.into_inner())
}

/// Writes the widget's zip to `out`; returns what to print.
pub fn write(out: &Path, public_url: &str) -> Result<String, String> {
    let address = address(public_url)?;
    let bytes = archive(&address)?;
    std::fs::write(out, &bytes).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    let mut text = format!(
        "wrote {} ({} files, {} bytes) for pbxgate at {address}\n\
         Upload it in Kommo: the integration's settings, tab \"Widget\"; then install the widget.\n\
         pbxgate needs crm.kind = \"kommo\", kommo.base_url, kommo.client_secret (the integration's\n\
         secret key, it checks the widget's tokens) and each user's extension in [[users]].",
        out.display(),
        FILES.len() + 1,
        bytes.len()
    );
    if address.starts_with("http://") {
        text.push_str(
            "\nwarning: the address is http://: browsers block it from Kommo's https pages; \
             serve pbxgate over https",
        );
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::io::Read;

    use serde_json::Value;

    use super::*;

    fn read(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        (0..zip.len())
            .map(|i| {
                let mut f = zip.by_index(i).unwrap();
                let mut content = Vec::new();
                f.read_to_end(&mut content).unwrap();
                (f.name().to_string(), content)
            })
            .collect()
    }

    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
        assert_eq!(&bytes[12..16], b"IHDR");
        let n = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        (n(16), n(20))
    }

    /// Every key of a JSON object, dotted.
    fn keys(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
        if let Value::Object(map) = v {
            for (k, v) in map {
                let key = format!("{prefix}{k}");
                keys(v, &format!("{key}."), out);
                out.insert(key);
            }
        }
    }

    #[test]
    fn the_archive_holds_the_widget_with_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("widget.zip");
        let said = write(&out, "https://pbx.example.com/").unwrap();
        assert!(said.contains("https://pbx.example.com"), "{said}");
        assert!(!said.contains("warning"), "{said}");
        let files = read(&std::fs::read(&out).unwrap());
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        for wanted in [
            "manifest.json",
            "script.js",
            "i18n/en.json",
            "i18n/ru.json",
            "images/logo.png",
            "images/logo_min.png",
            "images/logo_small.png",
            "images/logo_medium.png",
            "images/logo_main.png",
        ] {
            assert!(names.contains(&wanted), "{wanted} in {names:?}");
        }
        let file = |name: &str| &files.iter().find(|(n, _)| n == name).unwrap().1;

        let script = String::from_utf8(file("script.js").clone()).unwrap();
        assert!(
            script.contains("var BAKED_URL = \"https://pbx.example.com\";"),
            "the address is written in"
        );
        assert!(
            script.starts_with("// The pbxgate widget") && script.contains("define(['jquery']")
        );

        let manifest: Value = serde_json::from_slice(file("manifest.json")).unwrap();
        assert_eq!(manifest["widget"]["init_once"], true);
        assert_eq!(manifest["widget"]["interface_version"], 2);
        assert!(manifest["widget"]["version"].is_string());
        let locations = manifest["locations"].as_array().unwrap();
        assert!(locations.iter().any(|l| l == "everywhere"));
        assert_eq!(manifest["settings"]["pbxgate_url"]["type"], "text");

        // Every text the manifest names is in each language, and both have the same keys.
        let mut en = BTreeSet::new();
        keys(
            &serde_json::from_slice(file("i18n/en.json")).unwrap(),
            "",
            &mut en,
        );
        let mut ru = BTreeSet::new();
        keys(
            &serde_json::from_slice(file("i18n/ru.json")).unwrap(),
            "",
            &mut ru,
        );
        assert_eq!(en, ru);
        let mut named = vec![
            manifest["widget"]["name"].as_str().unwrap(),
            manifest["widget"]["description"].as_str().unwrap(),
            manifest["widget"]["short_description"].as_str().unwrap(),
        ];
        named.extend(
            manifest["settings"]
                .as_object()
                .unwrap()
                .values()
                .map(|s| s["name"].as_str().unwrap()),
        );
        for key in named {
            assert!(en.contains(key), "{key} in i18n");
        }
        for l in manifest["widget"]["locale"].as_array().unwrap() {
            assert!(names.contains(&format!("i18n/{}.json", l.as_str().unwrap()).as_str()));
        }

        // The logos Kommo asks for, at its sizes.
        for (name, size) in [
            ("images/logo.png", (130, 100)),
            ("images/logo_min.png", (84, 84)),
            ("images/logo_small.png", (108, 108)),
            ("images/logo_medium.png", (240, 84)),
            ("images/logo_main.png", (400, 272)),
        ] {
            let bytes = file(name);
            assert_eq!(png_size(bytes), size, "{name}");
            assert!(bytes.len() < 300 * 1024, "{name} under 300 KB");
        }
    }

    #[test]
    fn a_bad_address_is_refused_and_http_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("w.zip");
        assert!(write(&out, "pbx.example.com").is_err());
        assert!(write(&out, "ftp://pbx.example.com").is_err());
        assert!(write(&out, "https://pbx.example.com/?a=1").is_err());
        assert!(!out.exists(), "nothing written");
        let said = write(&out, "http://10.0.0.5:8080").unwrap();
        assert!(said.contains("warning"), "{said}");
        let e = write(&dir.path().join("no/such/dir/w.zip"), "https://x.example").unwrap_err();
        assert!(e.contains("cannot write"), "{e}");
    }

    #[test]
    fn the_address_is_a_safe_string_literal() {
        let s = script("https://pbx.example.com/a'b\"c").unwrap();
        assert!(s.contains(r#"var BAKED_URL = "https://pbx.example.com/a'b\"c";"#));
    }
}
