//! Simulated hosts for tests: network namespaces (made by the test, removed when dropped),
//! alone or joined by a switch as hosts on one network.
use crate::{run, stderr, weft_bin};
use std::process::{Command, Output};

/// A simulated host: a network namespace with its loopback up.
pub struct Host {
    pub name: String,
}

impl Host {
    /// `None` (and a line saying why) where this machine cannot make namespaces.
    pub fn new(tag: &str) -> Option<Host> {
        let name = format!("weft-t-{tag}-{}", std::process::id());
        let made = run("ip", &["netns", "add", &name]);
        if !made.status.success() {
            eprintln!(
                "SKIPPED: cannot create network namespaces here ({}); the transparent tests need root",
                stderr(&made).trim()
            );
            return None;
        }
        let host = Host { name };
        assert!(host.run("ip", &["link", "set", "lo", "up"]).status.success());
        Some(host)
    }

    /// `program` in the host's network namespace. Through `nsenter --net` rather than `ip
    /// netns exec`, which would also give it a mount namespace of its own: the namespaces
    /// `weft run` makes there would be mounted where no one else sees them, as on a real host
    /// they are not.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name)).arg("--").arg(program);
        c
    }

    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.cmd(program).args(args).output().unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.cmd(weft_bin()).arg("cleanup").output();
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Simulated hosts joined by a switch (a bridge in a namespace of its own): host `h` is
/// 10.99.0.h on it, its instances get 10.240.h.0/24 (its bridge 10.240.h.1), and every host
/// routes the others' instance ranges to them, as a network of real hosts would.
pub struct Fabric {
    pub hosts: Vec<Host>,
    pub switch: Host,
}

impl Fabric {
    pub fn new(tag: &str, n: u8) -> Option<Fabric> {
        let switch = Host::new(&format!("{tag}-sw"))?;
        assert!(switch.run("ip", &["link", "add", "br0", "type", "bridge"]).status.success());
        assert!(switch.run("ip", &["link", "set", "br0", "up"]).status.success());
        let mut hosts = Vec::new();
        for h in 1..=n {
            let host = Host::new(&format!("{tag}-h{h}"))?;
            let port = format!("p{h}");
            let made =
                switch.run("ip", &["link", "add", &port, "type", "veth", "peer", "name", "fab", "netns", &host.name]);
            assert!(made.status.success(), "{}", stderr(&made));
            assert!(switch.run("ip", &["link", "set", &port, "master", "br0", "up"]).status.success());
            for args in
                [vec!["addr", "add", &*format!("10.99.0.{h}/24"), "dev", "fab"], vec!["link", "set", "fab", "up"]]
            {
                let out = host.run("ip", &args);
                assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
            }
            assert!(host.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).status.success());
            for other in (1..=n).filter(|o| *o != h) {
                let out = host
                    .run("ip", &["route", "add", &format!("10.240.{other}.0/24"), "via", &format!("10.99.0.{other}")]);
                assert!(out.status.success(), "{}", stderr(&out));
            }
            hosts.push(host);
        }
        Some(Fabric { hosts, switch })
    }
}
