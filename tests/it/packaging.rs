//! The shipped systemd unit and the Debian package's description: the unit loads
//! (`systemd-analyze verify`), and every file the package names is in the tree.

use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn unit() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("scripts/pbxgate.service")).unwrap()
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    // `verify` checks that the program exists: the one just built stands in for /usr/bin's.
    let text = unit().replace("/usr/bin/pbxgate", env!("CARGO_BIN_EXE_pbxgate"));
    assert_ne!(text, unit(), "the unit runs /usr/bin/pbxgate");
    let path = dir.path().join("pbxgate.service");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Warnings about this unit (not about the host's other units) count as failures too.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("pbxgate.service"))
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
}

#[test]
fn the_unit_has_no_inline_comments_and_what_a_service_needs() {
    let text = unit();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        // systemd takes `#` only at a line's start: anything after a value becomes part of it.
        assert!(!line.contains(" #") && !line.contains(";"), "{line}");
    }
    for needed in [
        "Restart=always",
        "Wants=network-online.target",
        "After=network-online.target",
        "StateDirectory=pbxgate",
        "User=pbxgate",
        "ExecStart=/usr/bin/pbxgate --config /etc/pbxgate/config.toml serve",
    ] {
        assert!(text.lines().any(|l| l == needed), "{needed} missing");
    }
}

#[test]
fn every_file_the_debian_package_names_exists() {
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap())
            .unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    for asset in deb["assets"].as_array().unwrap() {
        let source = asset[0].as_str().unwrap();
        if source.starts_with("target/") {
            continue; // built by `cargo deb`
        }
        if source.contains('*') {
            let dir = Path::new(ROOT).join(Path::new(source).parent().unwrap());
            assert!(
                std::fs::read_dir(&dir).unwrap().next().is_some(),
                "{source}"
            );
        } else {
            assert!(Path::new(ROOT).join(source).is_file(), "{source}");
        }
    }
    let scripts = Path::new(ROOT).join(deb["maintainer-scripts"].as_str().unwrap());
    let postinst = std::fs::read_to_string(scripts.join("postinst")).unwrap();
    assert!(postinst.contains("#DEBHELPER#"), "{postinst}");
    assert!(postinst.contains("adduser --system"), "{postinst}");
    let units = &deb["systemd-units"];
    let unit = Path::new(ROOT)
        .join(units["unit-scripts"].as_str().unwrap())
        .join(format!("{}.service", units["unit-name"].as_str().unwrap()));
    assert!(unit.is_file(), "{}", unit.display());
    assert_eq!(
        deb["conf-files"].as_array().unwrap()[0].as_str(),
        Some("/etc/pbxgate/config.toml")
    );
}
