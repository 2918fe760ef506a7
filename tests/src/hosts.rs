//! Simulated hosts for tests: network namespaces (made by the test, removed when dropped),
//! alone or joined by a switch as hosts on one network.
use crate::{Proc, TestDir, run, stderr, stdout, weft_bin};
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

/// The IPv6 form weft gives an instance's address (or a virtual IP): the IPv4 one in
/// fd77:6566:7400::/96.
pub fn ipv6_of(v4: &str) -> std::net::Ipv6Addr {
    let v4: std::net::Ipv4Addr = v4.parse().unwrap_or_else(|_| panic!("{v4:?} is not an IPv4 address"));
    std::net::Ipv6Addr::from((0xfd77_6566_7400u128 << 80) | u128::from(u32::from(v4)))
}

/// Simulated hosts joined by a switch (a bridge in a namespace of its own): host `h` is
/// 10.99.0.h on it, its instances get 10.240.h.0/24 (its bridge 10.240.h.1), and every host
/// routes the others' instance ranges to them, as a network of real hosts would; the same over
/// IPv6, in the IPv6 form of each address ([`ipv6_of`]).
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
            let address6 = format!("{}/120", ipv6_of(&format!("10.99.0.{h}")));
            for args in [
                vec!["addr", "add", &*format!("10.99.0.{h}/24"), "dev", "fab"],
                vec!["-6", "addr", "add", &address6, "dev", "fab", "nodad"],
                vec!["link", "set", "fab", "up"],
            ] {
                let out = host.run("ip", &args);
                assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
            }
            for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
                assert!(host.run("sysctl", &["-qw", sysctl]).status.success(), "{sysctl}");
            }
            for other in (1..=n).filter(|o| *o != h) {
                let (range, via) = (format!("10.240.{other}.0"), format!("10.99.0.{other}"));
                let range6 = format!("{}/120", ipv6_of(&range));
                let via6 = ipv6_of(&via).to_string();
                for args in [
                    vec!["route", "add", &*format!("{range}/24"), "via", &via],
                    vec!["-6", "route", "add", &range6, "via", &via6],
                ] {
                    let out = host.run("ip", &args);
                    assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
                }
            }
            hosts.push(host);
        }
        Some(Fabric { hosts, switch })
    }
}

/// A host's shell, as the README's reader types into it: variables set on one line are
/// there on the next; a line ending in `&` keeps running (a process the test kills).
pub struct Shell {
    pub host: usize,
    pub home: std::path::PathBuf,
    pub env: Vec<(String, String)>,
    pub procs: Vec<Proc>,
}

impl Shell {
    /// Host `host`'s shell (1-based), in `home` (its directory and `HOME`), with the weft
    /// binaries under test first in its `PATH`.
    pub fn new(host: usize, home: std::path::PathBuf) -> Shell {
        std::fs::create_dir_all(&home).unwrap();
        let bin_dir = weft_bin().parent().unwrap().to_owned();
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        Shell { host, home, env: vec![("PATH".into(), path)], procs: Vec::new() }
    }

    /// `sh -c LINE` on this host, in its directory, with its variables.
    pub fn command(&self, fabric: &Fabric, line: &str) -> Command {
        let mut cmd = fabric.hosts[self.host - 1].cmd("sh");
        // The host's own credentials file, under its HOME (not the test's, which `Proc` sets).
        cmd.args(["-c", &format!("unset WEFT_CONFIG XDG_CONFIG_HOME\n{line}")]);
        cmd.current_dir(&self.home).env("HOME", &self.home).env_remove("WEFT_TOKEN");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs a README block here (10.0.0.K read as this fabric's 10.99.0.K; `ME=10.0.0.1` as this
    /// host's address); the output of each line that ran to its end.
    pub fn run_block(&mut self, dir: &TestDir, fabric: &Fabric, block: &str) -> Vec<String> {
        let block = block.replace("ME=10.0.0.1", &format!("ME=10.0.0.{}", self.host)).replace("10.0.0.", "10.99.0.");
        let mut said = Vec::new();
        for line in block.replace("\\\n", " ").lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let assignment = line
                .trim_start_matches("export ")
                .split_once('=')
                .filter(|(name, _)| !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
            if let Some((name, _)) = assignment {
                let out = self.command(fabric, &format!("{line}\nprintf %s \"${name}\"")).output().unwrap();
                let value = stdout(&out);
                assert!(out.status.success() && !value.is_empty(), "host {}: {line}: {}", self.host, stderr(&out));
                self.env.push((name.to_owned(), value));
            } else if let Some(background) = line.strip_suffix('&') {
                let name = format!("host{}-{}", self.host, self.procs.len());
                let proc = Proc::spawn(dir, &name, &mut self.command(fabric, &format!("exec {background}")));
                self.procs.push(proc);
            } else {
                let out = self.command(fabric, line).output().unwrap();
                assert!(out.status.success(), "host {}: {line}: {}{}", self.host, stdout(&out), stderr(&out));
                said.push(stdout(&out));
            }
        }
        said
    }
}

/// The code blocks in `lang` (e.g. `sh`) of the README's section whose heading starts with
/// `heading`, in order.
pub fn readme_blocks(heading: &str, lang: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section =
        readme.split(&format!("\n## {heading}")).nth(1).unwrap_or_else(|| panic!("README: no section {heading}"));
    let section = section.split("\n## ").next().unwrap();
    let fence = format!("```{lang}\n");
    section.split(fence.as_str()).skip(1).map(|b| b.split("```").next().unwrap().to_owned()).collect()
}
