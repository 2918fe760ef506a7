//! `weft run`: an app and its sidecar as one unit. The sidecar starts first (so a port
//! conflict stops everything before the app runs); when the app exits the sidecar leaves the
//! mesh, and a stop signal takes the sidecar out of the mesh before the app is stopped.
use crate::cli::RunArgs;
use crate::supervise;
use std::process::ExitCode;
use std::time::Duration;

/// Credentials `weft run` may be given in its environment (the join token, the admin
/// credential, the credentials file's location): the app never needs them, so it never sees
/// them.
pub const CREDENTIAL_VARS: &[&str] = &["WEFT_TOKEN", "WEFT_ADMIN_TOKEN", "WEFT_CONFIG"];

/// Environment an app is started with, naming its port, identity and upstream listeners.
pub fn app_env(opts: &weft_proxy::ProxyOptions, port: u16) -> Vec<(String, String)> {
    let mut env = vec![("PORT".to_owned(), port.to_string()), ("WEFT_INSTANCE".to_owned(), opts.id.clone())];
    if let Some(s) = &opts.service {
        env.push(("WEFT_SERVICE".to_owned(), s.clone()));
    }
    if let Some(v) = opts.labels.get("version") {
        env.push(("WEFT_VERSION".to_owned(), v.clone()));
    }
    if let Some((_, addr)) = opts.upstreams.first() {
        env.push(("WEFT_UPSTREAM".to_owned(), addr.to_string()));
    }
    for (svc, addr) in &opts.upstreams {
        let var = format!("WEFT_UPSTREAM_{}", svc.to_ascii_uppercase().replace('-', "_"));
        env.push((var, addr.to_string()));
    }
    env
}

pub async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let opts = a.proxy.options(Some(a.port))?;
    let env = app_env(&opts, a.port);
    let proxy = weft_proxy::start(opts).await?;
    let mut app = match supervise::spawn(&a.command, &env, CREDENTIAL_VARS, false) {
        Ok(c) => c,
        Err(e) => {
            proxy.stop().await;
            return Err(e);
        }
    };
    let code = tokio::select! {
        status = app.wait() => {
            let code = status.map(|s| exit_code(&s)).unwrap_or(1);
            tracing::info!(code, "app exited; stopping its sidecar");
            proxy.stop().await;
            code
        }
        // Leave the mesh and serve what is in flight, then stop the app, then the sidecar
        // (which serves the app's own calls while it stops).
        _ = supervise::stop_signal() => {
            let mut proxy = proxy;
            proxy.drain().await;
            let code = supervise::stop(&mut app, Duration::from_secs(10)).await.unwrap_or(0);
            proxy.stop().await;
            code
        }
    };
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// An exit status as a shell reports it: the code, or 128 + the signal that killed the process.
fn exit_code(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1)
}
