//! The sidecar's resolver, for a transparent instance (mesh DNS): it answers the mesh's names
//! with their services' virtual IPs and forwards every other question to the host's resolvers,
//! over UDP and TCP. A service `backend` in namespace `default` of trust domain `weft.local`
//! answers to `backend`, `backend.default`, `backend.default.svc` and
//! `backend.default.svc.weft.local`; an unknown name under `svc.weft.local` is the mesh's to
//! deny (NXDOMAIN), not the host's to guess. Where the instance has IPv6, a mesh name has an
//! IPv6 address too (AAAA): its virtual IP's IPv6 form ([`weft_api::names::mesh_ipv6`]).
use arc_swap::ArcSwap;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// How long answers about mesh names may be cached: short, since they are ours to change.
const TTL: u32 = 30;
/// How long a forwarded question may wait for the host's resolver.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);

/// The mesh's names: every form of each service's name, to its virtual IP.
#[derive(Debug, Default)]
pub struct MeshNames {
    by_name: HashMap<String, Ipv4Addr>,
    /// `svc.TRUST_DOMAIN`: names under it are the mesh's alone.
    zone: String,
}

impl MeshNames {
    pub fn new<'a>(
        services: impl IntoIterator<Item = (&'a str, Ipv4Addr)>,
        namespace: &str,
        trust_domain: &str,
    ) -> MeshNames {
        let mut by_name = HashMap::new();
        for (service, vip) in services {
            let service = service.to_ascii_lowercase();
            for name in [
                service.clone(),
                format!("{service}.{namespace}"),
                format!("{service}.{namespace}.svc"),
                format!("{service}.{namespace}.svc.{trust_domain}"),
            ] {
                by_name.insert(name, vip);
            }
        }
        MeshNames { by_name, zone: format!("svc.{trust_domain}") }
    }

    fn lookup(&self, name: &str) -> Lookup {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match self.by_name.get(&name) {
            Some(ip) => Lookup::Mesh(*ip),
            None if name == self.zone || name.ends_with(&format!(".{}", self.zone)) => Lookup::NoSuchName,
            None => Lookup::Elsewhere,
        }
    }
}

enum Lookup {
    Mesh(Ipv4Addr),
    NoSuchName,
    Elsewhere,
}

/// The resolver: the mesh's names as the latest config has them, and where the rest goes.
pub struct Resolver {
    names: ArcSwap<MeshNames>,
    upstreams: Vec<SocketAddr>,
    /// Whether mesh names have IPv6 addresses (the instance has IPv6).
    ipv6: bool,
}

impl Resolver {
    pub fn new(upstreams: Vec<SocketAddr>, ipv6: bool) -> Arc<Resolver> {
        Arc::new(Resolver { names: ArcSwap::from_pointee(MeshNames::default()), upstreams, ipv6 })
    }

    pub fn update(&self, names: MeshNames) {
        self.names.store(Arc::new(names));
    }

    /// The answer to `query` if it is the mesh's to give; `None`: ask the host's resolvers.
    fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let Ok(msg) = Message::from_vec(query) else {
            // Not a question we can read: the host's resolver says what it says.
            return None;
        };
        let q = msg.queries().first()?.clone();
        let found = self.names.load().lookup(&q.name().to_ascii());
        let mut reply = Message::new();
        reply
            .set_id(msg.id())
            .set_message_type(MessageType::Response)
            .set_op_code(msg.op_code())
            .set_recursion_desired(msg.recursion_desired())
            .set_recursion_available(true)
            .set_authoritative(true)
            .add_query(q.clone());
        match found {
            Lookup::Elsewhere => return None,
            Lookup::NoSuchName => {
                reply.set_response_code(ResponseCode::NXDomain);
            }
            // A for the virtual IP, AAAA for its IPv6 form where the instance has IPv6; any
            // other type of a mesh name exists with no data (so clients asking AAAA and A at
            // once use the A).
            Lookup::Mesh(ip) => {
                let name: Name = q.name().clone();
                match q.query_type() {
                    RecordType::A => {
                        reply.add_answer(Record::from_rdata(name, TTL, RData::A(A(ip))));
                    }
                    RecordType::AAAA if self.ipv6 => {
                        let v6 = weft_api::names::mesh_ipv6(ip);
                        reply.add_answer(Record::from_rdata(name, TTL, RData::AAAA(AAAA(v6))));
                    }
                    _ => {}
                }
            }
        }
        reply.to_vec().ok()
    }

    /// Asks the host's resolvers over UDP, in order; SERVFAIL if none answers.
    async fn forward_udp(&self, query: &[u8]) -> Vec<u8> {
        for upstream in &self.upstreams {
            let bind = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let Ok(socket) = UdpSocket::bind(bind).await else { continue };
            crate::transport::mark(&socket);
            if socket.connect(upstream).await.is_err() || socket.send(query).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; 65535];
            if let Ok(Ok(n)) = tokio::time::timeout(FORWARD_TIMEOUT, socket.recv(&mut buf)).await {
                buf.truncate(n);
                return buf;
            }
        }
        servfail(query)
    }

    /// Asks the host's resolvers over TCP, in order; SERVFAIL if none answers.
    async fn forward_tcp(&self, query: &[u8]) -> Vec<u8> {
        for upstream in &self.upstreams {
            let ask = async {
                let mut s = crate::transport::connect_marked(*upstream).await?;
                s.write_all(&(query.len() as u16).to_be_bytes()).await?;
                s.write_all(query).await?;
                read_framed(&mut s).await
            };
            if let Ok(Ok(reply)) = tokio::time::timeout(FORWARD_TIMEOUT, ask).await {
                return reply;
            }
        }
        servfail(query)
    }
}

fn servfail(query: &[u8]) -> Vec<u8> {
    let Ok(msg) = Message::from_vec(query) else { return Vec::new() };
    let mut reply = Message::new();
    reply.set_id(msg.id()).set_message_type(MessageType::Response).set_response_code(ResponseCode::ServFail);
    for q in msg.queries() {
        reply.add_query(q.clone());
    }
    reply.to_vec().unwrap_or_default()
}

async fn read_framed<S: AsyncReadExt + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let len = s.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Binds the resolver's UDP and TCP sockets on `listen` (now, so a conflict is reported at
/// startup) and serves them until the proxy stops.
pub fn serve(listen: SocketAddr, resolver: Arc<Resolver>) -> anyhow::Result<()> {
    let udp = std::net::UdpSocket::bind(listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (UDP) for DNS: {e}"))?;
    udp.set_nonblocking(true)?;
    let tcp = std::net::TcpListener::bind(listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (TCP) for DNS: {e}"))?;
    tcp.set_nonblocking(true)?;
    let (udp, tcp) = (Arc::new(UdpSocket::from_std(udp)?), TcpListener::from_std(tcp)?);
    let r = resolver.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else { continue };
            let query = buf[..n].to_vec();
            let (r, udp) = (r.clone(), udp.clone());
            tokio::spawn(async move {
                let reply = match r.answer(&query) {
                    Some(reply) => reply,
                    None => r.forward_udp(&query).await,
                };
                let _ = udp.send_to(&reply, from).await;
            });
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = tcp.accept().await else { continue };
            let r = resolver.clone();
            tokio::spawn(async move {
                // One connection may carry several questions (RFC 7766).
                while let Ok(Ok(query)) = tokio::time::timeout(Duration::from_secs(10), read_framed(&mut s)).await {
                    let reply = match r.answer(&query) {
                        Some(reply) => reply,
                        None => r.forward_tcp(&query).await,
                    };
                    if s.write_all(&(reply.len() as u16).to_be_bytes()).await.is_err()
                        || s.write_all(&reply).await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// The nameservers of a resolv.conf, reachable from an instance's namespace (not its loopback).
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .filter(|ip| !ip.is_loopback())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn ask(r: &Resolver, name: &str, t: RecordType) -> Option<Message> {
        let mut q = Message::new();
        q.set_id(7).set_recursion_desired(true).add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        r.answer(&q.to_vec().unwrap()).map(|b| Message::from_vec(&b).unwrap())
    }

    #[test]
    fn every_form_of_a_mesh_name_resolves_to_its_virtual_ip() {
        let r = Resolver::new(vec![], false);
        let vip = Ipv4Addr::new(240, 240, 0, 9);
        r.update(MeshNames::new([("backend", vip)], "default", "weft.local"));
        for name in ["backend", "backend.", "Backend.default", "backend.default.svc", "backend.default.svc.weft.local."]
        {
            let m = ask(&r, name, RecordType::A).unwrap_or_else(|| panic!("{name} forwarded"));
            assert_eq!(m.id(), 7);
            assert_eq!(m.response_code(), ResponseCode::NoError);
            let ips: Vec<_> = m.answers().iter().filter_map(|a| a.data().as_a().map(|a| a.0)).collect();
            assert_eq!(ips, vec![vip], "{name}");
        }
        // AAAA of a mesh name: it exists, with no IPv6 address.
        let m = ask(&r, "backend", RecordType::AAAA).unwrap();
        assert_eq!((m.response_code(), m.answers().len()), (ResponseCode::NoError, 0));
        // The mesh's zone is the mesh's: an unknown service there does not exist.
        let m = ask(&r, "nothing.default.svc.weft.local", RecordType::A).unwrap();
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        // Anything else is the host's resolver's to answer.
        assert!(ask(&r, "example.org", RecordType::A).is_none());
        assert!(ask(&r, "backendx", RecordType::A).is_none());
        // Where the instance has IPv6: AAAA, the virtual IP's IPv6 form.
        let r6 = Resolver::new(vec![], true);
        r6.update(MeshNames::new([("backend", vip)], "default", "weft.local"));
        let m = ask(&r6, "backend.default", RecordType::AAAA).unwrap();
        let ips: Vec<_> = m.answers().iter().filter_map(|a| a.data().as_aaaa().map(|a| a.0)).collect();
        assert_eq!(ips, vec![weft_api::names::mesh_ipv6(vip)]);
        let m = ask(&r6, "backend", RecordType::A).unwrap();
        assert_eq!(m.answers().len(), 1, "and A as before");
    }

    #[test]
    fn loopback_nameservers_are_not_forwarded_to() {
        let conf = "# comment\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nsearch example\nnameserver ::1\n";
        assert_eq!(nameservers(conf), vec!["10.255.255.53:53".parse().unwrap()]);
    }
}
