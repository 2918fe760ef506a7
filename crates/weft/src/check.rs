//! `weft check`: pre-flight and health checks, one pass/fail line each with the fix. This side
//! checks what only the CLI sees (the control plane reachable over verified TLS, the admin
//! credential, the clock), then prints the control plane's own checks (`GET /api/v1/check`:
//! store, proxies' config and trust bundle, certificates, resources that select nothing).
use crate::api_client::Api;
use crate::cli::ControlAddr;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The most the CLI's and the control plane's clocks may differ: certificates are checked
/// against the clock, and a skewed one makes fresh certificates look not yet valid.
const MAX_SKEW: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Check {
    name: String,
    /// `ok`, `warn` or `fail`.
    status: String,
    detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

impl Check {
    fn new(name: &str, status: &str, detail: impl Into<String>, fix: Option<&str>) -> Check {
        Check { name: name.into(), status: status.into(), detail: detail.into(), fix: fix.map(str::to_owned) }
    }
}

/// Runs the checks and prints them; whether none failed.
pub async fn run(control: &ControlAddr, output: &str) -> anyhow::Result<bool> {
    let checks = gather(control).await;
    let failed = checks.iter().any(|c| c.status == "fail");
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"ok": !failed, "checks": checks}))?);
    } else {
        let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &checks {
            let mark = match c.status.as_str() {
                "ok" => "ok  ",
                "warn" => "WARN",
                _ => "FAIL",
            };
            println!("{mark} {:<width$}  {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("     {:<width$}  fix: {fix}", "");
            }
        }
        let (warned, bad) = (
            checks.iter().filter(|c| c.status == "warn").count(),
            checks.iter().filter(|c| c.status == "fail").count(),
        );
        println!("\n{} checks: {} failed, {} warnings", checks.len(), bad, warned);
    }
    Ok(!failed)
}

async fn gather(control: &ControlAddr) -> Vec<Check> {
    let api = match Api::new(control) {
        Ok(api) => api,
        Err(e) => {
            return vec![Check::new(
                "control plane credentials",
                "fail",
                format!("{e:#}"),
                Some(
                    "run weft check on the control plane's machine, or pass --ca-file and --admin-token (WEFT_CA_FILE, WEFT_ADMIN_TOKEN)",
                ),
            )];
        }
    };
    let mut out = Vec::new();
    match api.call(Method::GET, "/healthz", None).await {
        Ok((status, _)) if status.is_success() => out.push(Check::new(
            "control plane reachable",
            "ok",
            format!("{} answers over TLS with a certificate of this mesh's root", control.control),
            None,
        )),
        Ok((status, _)) => {
            out.push(Check::new(
                "control plane reachable",
                "fail",
                format!("{} answers /healthz with {status}", control.control),
                Some("is --control the weft control plane's address?"),
            ));
            return out;
        }
        Err(e) => {
            out.push(Check::new(
                "control plane reachable",
                "fail",
                format!("{e:#}"),
                Some("start it (weft control, or weft up) or point --control at it; a certificate error means --ca-file is not this mesh's root"),
            ));
            return out;
        }
    }
    let before = SystemTime::now();
    let (status, body) = match api.call(Method::GET, "/api/v1/check", None).await {
        Ok(r) => r,
        Err(e) => {
            out.push(Check::new("control plane checks", "fail", format!("{e:#}"), None));
            return out;
        }
    };
    if status == StatusCode::UNAUTHORIZED {
        out.push(Check::new(
            "admin credential",
            "fail",
            body["error"].as_str().unwrap_or("refused").to_owned(),
            Some("pass the control plane's admin credential: --admin-token or WEFT_ADMIN_TOKEN (DATA_DIR/admin.token)"),
        ));
        return out;
    }
    if !status.is_success() {
        out.push(Check::new("control plane checks", "fail", format!("{status}: {body}"), None));
        return out;
    }
    out.push(Check::new("admin credential", "ok", "accepted", None));
    out.push(clock(before, body["time"].as_u64()));
    match serde_json::from_value::<Vec<Check>>(body["checks"].clone()) {
        Ok(checks) => out.extend(checks),
        Err(e) => out.push(Check::new("control plane checks", "fail", format!("unreadable answer: {e}"), None)),
    }
    out
}

/// The control plane's clock (Unix seconds when it answered) against this machine's.
fn clock(asked: SystemTime, theirs: Option<u64>) -> Check {
    let Some(theirs) = theirs else {
        return Check::new("clock", "warn", "the control plane did not say its time", None);
    };
    let mine = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    // Its second is somewhere between asking and the answer; a skew beyond both is real.
    let (from, to) = (mine(asked) - 1.0, mine(SystemTime::now()) + 1.0);
    let theirs = theirs as f64;
    let skew = if theirs < from {
        from - theirs
    } else if theirs > to {
        theirs - to
    } else {
        0.0
    };
    if skew > MAX_SKEW.as_secs_f64() {
        Check::new(
            "clock",
            "fail",
            format!("this machine's clock and the control plane's differ by {skew:.0}s"),
            Some("synchronise both clocks (NTP): certificates are checked against them"),
        )
    } else {
        Check::new("clock", "ok", "within 5s of the control plane's", None)
    }
}
