//! Child processes and signals: starting apps (and, in `weft up`, instances), forwarding a
//! stop to them, and making sure none outlives its parent.
use std::os::fd::{AsRawFd, BorrowedFd};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Resolves on the first SIGINT or SIGTERM.
pub async fn stop_signal() {
    match StopSignals::new() {
        Ok(mut signals) => signals.next().await,
        // Without signal handlers we can only run until killed.
        Err(_) => std::future::pending().await,
    }
}

/// SIGTERM and SIGINT, each a request to stop, for as long as this lives.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    pub fn new() -> std::io::Result<StopSignals> {
        Ok(StopSignals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Resolves on the next SIGTERM or SIGINT.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Spawns `argv` so that it is killed if this process dies, however it dies, with `env` added
/// to this process's environment and the variables `strip` taken out of it; `cgroup` (an open
/// `cgroup.procs`) is the cgroup it starts in.
pub fn spawn(
    argv: &[String],
    env: &[(String, String)],
    strip: &[&str],
    quiet: bool,
    cgroup: Option<BorrowedFd<'_>>,
) -> anyhow::Result<Child> {
    let (program, args) = argv.split_first().ok_or_else(|| anyhow::anyhow!("empty command"))?;
    let mut cmd = Command::new(program);
    for var in strip {
        cmd.env_remove(var);
    }
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    if quiet {
        cmd.stdout(Stdio::null());
    }
    spawn_in(cmd, cgroup).map_err(|e| anyhow::anyhow!("cannot start {program:?}: {e}"))
}

/// Spawns `cmd` (with no input) so that it is killed if this process dies, however it dies.
pub fn spawn_command(cmd: Command) -> std::io::Result<Child> {
    spawn_in(cmd, None)
}

/// [`spawn_command`], the child first joining the cgroup whose `cgroup.procs` is `cgroup`.
#[allow(unsafe_code)]
fn spawn_in(mut cmd: Command, cgroup: Option<BorrowedFd<'_>>) -> std::io::Result<Child> {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let cgroup = cgroup.map(|fd| fd.as_raw_fd());
    // SAFETY: pre_exec runs in the forked child before exec; prctl(PR_SET_PDEATHSIG) and
    // write(2) are async-signal-safe and touch no memory of the parent. The first is the only
    // way to tie the child's life to ours when we are SIGKILLed and cannot clean up; the second
    // moves the child ("0": the writer) into the cgroup before it runs anything. `cgroup` is
    // open for as long as this call, which the fork happens in.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)?;
            if let Some(fd) = cgroup {
                nix::unistd::write(BorrowedFd::borrow_raw(fd), b"0").map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    cmd.spawn()
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

/// An exit status as a shell reports it: the code, or 128 + the signal that killed the process.
pub fn exit_code(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1)
}
