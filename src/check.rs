//! `pbxgate check`: a configuration doctor. Each check prints one line, ✓ or ✗ with a reason.

use std::io::Write;

use crate::config::{Config, Origin};
use crate::store::Store;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub ok: bool,
    /// Works, but something will not reach the CRM (`!`): does not fail the check.
    pub warning: bool,
    pub text: String,
}

impl std::fmt::Display for CheckLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = match (self.ok, self.warning) {
            (false, _) => "✗",
            (true, true) => "!",
            (true, false) => "✓",
        };
        write!(f, "{mark} {}", self.text)
    }
}

fn line(ok: bool, text: impl Into<String>) -> CheckLine {
    CheckLine {
        ok,
        warning: false,
        text: text.into(),
    }
}

/// Configuration that works but keeps some calls from the CRM; also logged at startup.
pub fn config_warnings(config: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if config.calls.unassigned().is_none() {
        w.push(
            "calls.unassigned_code is empty: calls no extension touched (hung up in the IVR or \
             a queue before any phone rang) are kept locally, held, and cannot reach the CRM"
                .to_string(),
        );
    }
    w
}

/// Runs every check (config validity was checked by loading it), printing each line as it is
/// known. Returns whether all passed.
pub async fn run(config: &Config, origin: &Origin, out: &mut dyn Write) -> bool {
    let mut all_ok = true;
    let mut emit = |l: CheckLine| {
        all_ok &= l.ok;
        let _ = writeln!(out, "{l}");
        let _ = out.flush();
    };

    emit(line(true, format!("config valid ({origin})")));
    for w in config_warnings(config) {
        emit(CheckLine {
            ok: true,
            warning: true,
            text: w,
        });
    }
    emit(check_store(config).await);
    emit(check_crm(config).await);
    emit(check_ami(config).await);
    all_ok
}

async fn check_store(config: &Config) -> CheckLine {
    let path = config.storage.path.display().to_string();
    match Store::open(&config.storage.path) {
        Ok(store) => match store.check_writable().await {
            Ok(()) => line(true, format!("store writable ({path})")),
            Err(e) => line(false, format!("store not writable: {e}")),
        },
        Err(e) => line(false, format!("store cannot be opened: {e}")),
    }
}

async fn check_crm(config: &Config) -> CheckLine {
    // The check needs no clientId: it registers nothing.
    let crm = match crate::crm::connect(
        std::sync::Arc::new(config.clone()),
        crate::base::secret::Secret::new(""),
    ) {
        Ok(c) => c,
        Err(e) => return line(false, format!("CRM client: {e}")),
    };
    match crm.check().await {
        Ok(text) => line(true, text),
        Err(text) => line(false, text),
    }
}

async fn check_ami(config: &Config) -> CheckLine {
    let addr = format!("{}:{}", config.ami.host, config.ami.port);
    match crate::pbx::ami::AmiClient::probe(&config.ami).await {
        Ok(banner) => line(
            true,
            format!(
                "AMI {addr} reachable ({banner}), login accepted for {}",
                config.ami.username
            ),
        ),
        Err(e) => line(false, format!("AMI {addr}: {e}")),
    }
}
