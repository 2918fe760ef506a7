//! Child processes and signals: starting apps and sidecars, forwarding a stop to them, and
//! making sure none outlives its parent.
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// Resolves on the first SIGINT or SIGTERM.
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        // Without signal handlers we can only run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// Spawns `argv` so that it is killed if this process dies, however it dies, with `env` added
/// to this process's environment and the variables `strip` taken out of it.
#[allow(unsafe_code)]
pub fn spawn(argv: &[String], env: &[(String, String)], strip: &[&str], quiet: bool) -> anyhow::Result<Child> {
    let (program, args) = argv.split_first().ok_or_else(|| anyhow::anyhow!("empty command"))?;
    let mut cmd = Command::new(program);
    for var in strip {
        cmd.env_remove(var);
    }
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v))).stdin(Stdio::null()).kill_on_drop(true);
    if quiet {
        cmd.stdout(Stdio::null());
    }
    // SAFETY: pre_exec runs in the forked child before exec; prctl(PR_SET_PDEATHSIG) is
    // async-signal-safe and touches no memory of the parent. It is the only way to tie the
    // child's life to ours when we are SIGKILLed and cannot clean up.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    cmd.spawn().map_err(|e| anyhow::anyhow!("cannot start {program:?}: {e}"))
}

/// Asks a child to stop (SIGTERM), then kills it after `grace`. Returns its exit code.
pub async fn stop(child: &mut Child, grace: Duration) -> Option<i32> {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(status)) => status.code(),
        _ => {
            let _ = child.kill().await;
            child.wait().await.ok().and_then(|s| s.code())
        }
    }
}
