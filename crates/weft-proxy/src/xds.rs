//! The proxy's xDS client: one ADS stream (state of the world) to the control plane, over TLS
//! verified against the mesh's trust bundle, authenticated with the proxy's join token.
//!
//! It subscribes to all clusters and listeners and to the trust bundle (SDS `ROOTCA`), then to
//! the endpoints and routes those name.
//! Each response is decoded and validated as a whole before anything is applied; a bad one is
//! NACKed with the reason and the previous config stays in force. When the control plane is
//! unreachable the proxy keeps serving and reconnects with capped exponential backoff; given
//! several replicas (`--control A,B,C`), it goes to the next one, telling it the versions it
//! holds.
use crate::config::{self, ClusterDef, ConfigError, EndpointDef, InvalidResource, ListenerDef, RouteDef};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use envoy_types::pb::google::rpc::Status;
use prost::Name;
use rustls::pki_types::ServerName;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::identity::ROOT_SECRET;
use weft_api::names;
use weft_client::ControlEndpoint;

const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Default)]
struct TypeState {
    names: BTreeSet<String>,
    version: String,
    nonce: String,
}

struct Stream<'a> {
    tx: mpsc::Sender<DiscoveryRequest>,
    types: HashMap<String, TypeState>,
    /// The version of each type held from earlier streams, sent in a type's first request.
    held: &'a mut HashMap<String, String>,
    /// RDS and EDS names whose first response has not arrived yet.
    awaiting: BTreeSet<(String, String)>,
    seen_lds: bool,
    seen_cds: bool,
}

impl Stream<'_> {
    fn state(&mut self, type_url: &str) -> &mut TypeState {
        let held = &self.held;
        self.types.entry(type_url.to_owned()).or_insert_with(|| TypeState {
            version: held.get(type_url).cloned().unwrap_or_default(),
            ..Default::default()
        })
    }

    async fn request(&mut self, type_url: String, error: Option<String>) {
        let st = self.state(&type_url);
        let req = DiscoveryRequest {
            version_info: st.version.clone(),
            resource_names: st.names.iter().cloned().collect(),
            type_url,
            response_nonce: st.nonce.clone(),
            error_detail: error.map(|message| Status { code: 3, message, details: vec![] }),
            ..Default::default()
        };
        let _ = self.tx.send(req).await;
    }

    /// Changes the names subscribed for an RDS/EDS type, sending a request if they changed.
    async fn subscribe(&mut self, type_url: String, names: BTreeSet<String>) {
        let old = std::mem::take(&mut self.state(&type_url).names);
        if old == names {
            self.state(&type_url).names = old;
            return;
        }
        for n in names.difference(&old) {
            self.awaiting.insert((type_url.clone(), n.clone()));
        }
        self.awaiting.retain(|(t, n)| t != &type_url || names.contains(n));
        self.state(&type_url).names = names;
        self.request(type_url, None).await;
    }
}

/// What the xDS client feeds: the proxy's runtime, through this one interface. The client
/// decodes and checks each response; the runtime puts it in force whole or not at all.
pub trait Runtime: Send + Sync + 'static {
    /// Who this proxy is, for each stream's node.
    fn node(&self) -> NodeInfo;
    /// Puts an update in force; an error leaves the previous config (the client NACKs).
    fn apply(&self, update: Update) -> Result<(), ConfigError>;
    /// What happened on the stream, for metrics, `/config_dump` and readiness.
    fn record(&self, event: Event<'_>);
    /// What the proxy reports on its report stream beside the xDS one, if it reports.
    fn reporter(&self) -> Option<Arc<crate::report::Reporter>> {
        None
    }
}

/// The proxy's identity and registration, sent as the stream's node.
pub struct NodeInfo {
    pub id: String,
    pub service: Option<String>,
    pub registration: weft_api::registry::InstanceRegistration,
    /// Proves a re-registration of the instance id is this proxy's.
    pub instance_key: String,
}

/// One decoded and checked response.
pub enum Update {
    Listeners(Vec<ListenerDef>),
    Clusters(Vec<ClusterDef>),
    Routes(Vec<RouteDef>),
    Endpoints(Vec<(String, Vec<EndpointDef>)>),
    TrustBundle { name: String, bundle: crate::config::BundleDef },
}

pub enum Event<'a> {
    Connected(bool),
    Accepted {
        type_url: &'a str,
        version: &'a str,
    },
    Rejected {
        type_url: &'a str,
        error: &'a str,
    },
    /// Listeners, clusters and everything they name have arrived: the first full config.
    Synced,
}

fn node(info: NodeInfo) -> Node {
    let registration = serde_json::to_string(&info.registration).expect("registration always serializes");
    let string = |s: String| Value { kind: Some(value::Kind::StringValue(s)) };
    Node {
        id: info.id,
        cluster: info.service.unwrap_or_default(),
        user_agent_name: "weft".to_owned(),
        metadata: Some(Struct {
            fields: [
                (names::NODE_METADATA_KEY.to_owned(), string(registration)),
                (names::NODE_INSTANCE_KEY.to_owned(), string(info.instance_key)),
            ]
            .into(),
        }),
        ..Default::default()
    }
}

/// `tls`: how to reach the control plane ([`crate::identity::Credentials::control_plane_config`]).
pub async fn run<R: Runtime>(proxy: Arc<R>, control: ControlEndpoint, tls: Arc<rustls::ClientConfig>) {
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    // The last refusal logged, so a lasting one is logged once.
    let mut refused = None;
    let addresses: Vec<String> = control.addresses().into_iter().map(str::to_owned).collect();
    let mut at = 0;
    let mut held = HashMap::new();
    loop {
        let address = &addresses[at % addresses.len().max(1)];
        match session(&proxy, &mut backoff, address, &control, &tls, &mut held).await {
            Ok(()) => tracing::warn!("control plane closed the xDS stream; reconnecting"),
            Err(e) => match e.downcast_ref::<tonic::Status>().filter(|s| s.code() == tonic::Code::PermissionDenied) {
                Some(s) if refused.as_deref() != Some(s.message()) => {
                    tracing::warn!(error = %s.message(), "the control plane refused this proxy's xDS stream; retrying");
                    refused = Some(s.message().to_owned());
                }
                Some(_) => {}
                None if !warned => {
                    tracing::warn!(control = %address, error = %e, "control plane unreachable; serving the last good config and retrying")
                }
                None => tracing::debug!(control = %address, error = %e, "xDS reconnect failed"),
            },
        }
        // The next replica, if there are several.
        at = (at + 1) % addresses.len().max(1);
        warned = true;
        proxy.record(Event::Connected(false));
        let jitter = fastrand::u64(0..=backoff.as_millis() as u64 / 4);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One xDS stream to the control plane at `address`; `held`: the versions held, kept up to date.
async fn session<R: Runtime>(
    proxy: &Arc<R>,
    backoff: &mut Duration,
    address: &str,
    control: &ControlEndpoint,
    tls: &Arc<rustls::ClientConfig>,
    held: &mut HashMap<String, String>,
) -> anyhow::Result<()> {
    // TLS to the control plane, verified against the live trust bundle; the join token as bearer.
    let server_name = ServerName::try_from(weft_client::host_of(address).to_owned())?;
    let endpoint_uri = address.to_owned();
    let address = address.to_owned();
    let connector = tokio_rustls::TlsConnector::from(tls.clone());
    let connect = tower::service_fn(move |_: http::Uri| {
        let (address, server_name, connector) = (address.clone(), server_name.clone(), connector.clone());
        async move {
            let tcp = crate::transport::connect_marked(
                tokio::net::lookup_host(&address)
                    .await?
                    .next()
                    .ok_or_else(|| std::io::Error::other("the control plane's name resolves to no address"))?,
            )
            .await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    // The connector makes the TLS connection; the origin keeps the requests' scheme `https`.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{endpoint_uri}"))?
        .origin(format!("https://{endpoint_uri}").parse()?)
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel = endpoint.connect_with_connector(connect).await?;
    let bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        control.credential.as_ref().and_then(|t| format!("Bearer {t}").parse().ok());
    // The report stream shares the connection and ends with this session; it opens once the
    // first response shows this stream's registration is in force.
    let mut reports = proxy.reporter().map(|r| {
        let node = proxy.node();
        let hello = weft_api::report::Hello { node: node.id, instance_key: node.instance_key };
        (channel.clone(), bearer.clone(), r, hello)
    });
    let mut _reporting = None;
    let with_token = move |mut req: tonic::Request<()>| {
        if let Some(b) = &bearer {
            req.metadata_mut().insert("authorization", b.clone());
        }
        Ok(req)
    };
    let mut client = AggregatedDiscoveryServiceClient::with_interceptor(channel, with_token)
        .max_decoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(16);
    // Clusters before listeners, as Envoy does: a listener's clusters are known when it arrives.
    let first =
        DiscoveryRequest { node: Some(node(proxy.node())), type_url: Cluster::type_url(), ..Default::default() };
    tx.send(first).await?;
    let mut responses = client.stream_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    let mut s = Stream { tx, types: HashMap::new(), held, awaiting: BTreeSet::new(), seen_lds: false, seen_cds: false };
    s.state(&Cluster::type_url());
    s.request(Listener::type_url(), None).await;
    // The trust bundle; listeners open only once it is here.
    s.subscribe(config::tls::secret_type_url(), BTreeSet::from([ROOT_SECRET.to_owned()])).await;
    proxy.record(Event::Connected(true));
    tracing::info!(control = %endpoint_uri, "connected to control plane");
    while let Some(resp) = responses.message().await? {
        *backoff = Duration::from_millis(100);
        handle(&**proxy, &mut s, resp).await;
        for (t, st) in &s.types {
            s.held.insert(t.clone(), st.version.clone());
        }
        if let Some((channel, bearer, r, hello)) = reports.take() {
            _reporting = Some(AbortOnDrop(tokio::spawn(crate::report::run(channel, bearer, r, hello))));
        }
    }
    Ok(())
}

async fn handle(proxy: &impl Runtime, s: &mut Stream<'_>, resp: DiscoveryResponse) {
    let type_url = resp.type_url.clone();
    let result = apply(proxy, s, &resp).await;
    let st = s.types.entry(type_url.clone()).or_default();
    st.nonce = resp.nonce.clone();
    match result {
        Ok(()) => {
            st.version = resp.version_info.clone();
            proxy.record(Event::Accepted { type_url: &type_url, version: &resp.version_info });
            s.request(type_url, None).await;
        }
        Err(e) => {
            let e = e.to_string();
            tracing::warn!(type_url = %type_url, error = %e, "rejected config from control plane (NACK); keeping the previous config");
            proxy.record(Event::Rejected { type_url: &type_url, error: &e });
            s.request(type_url, Some(e)).await;
        }
    }
    if s.seen_lds && s.seen_cds && s.awaiting.is_empty() {
        proxy.record(Event::Synced);
    }
}

fn decode_all<T>(
    resp: &DiscoveryResponse,
    f: fn(&envoy_types::pb::google::protobuf::Any) -> Result<T, InvalidResource>,
) -> Result<Vec<T>, InvalidResource> {
    resp.resources.iter().map(f).collect()
}

/// Decodes and checks a whole response, then applies it; on error nothing of it is applied.
async fn apply(proxy: &impl Runtime, s: &mut Stream<'_>, resp: &DiscoveryResponse) -> Result<(), ConfigError> {
    let t = resp.type_url.as_str();
    if t == Listener::type_url() {
        let defs = decode_all(resp, config::listener)?;
        let rds: BTreeSet<String> = defs
            .iter()
            .filter_map(|d| match &d.http {
                Some(config::HttpDef::Rds(n)) => Some(n.clone()),
                _ => None,
            })
            .collect();
        proxy.apply(Update::Listeners(defs))?;
        s.seen_lds = true;
        s.subscribe(RouteConfiguration::type_url(), rds).await;
    } else if t == Cluster::type_url() {
        let defs = decode_all(resp, config::cluster)?;
        let eds: BTreeSet<String> =
            defs.iter().filter(|d| d.static_endpoints.is_none() && !d.original_dst).map(|d| d.name.clone()).collect();
        proxy.apply(Update::Clusters(defs))?;
        s.seen_cds = true;
        s.subscribe(ClusterLoadAssignment::type_url(), eds).await;
    } else if t == RouteConfiguration::type_url() {
        let defs = decode_all(resp, config::route)?;
        for d in &defs {
            s.awaiting.remove(&(t.to_owned(), d.name.clone()));
        }
        proxy.apply(Update::Routes(defs))?;
    } else if t == ClusterLoadAssignment::type_url() {
        let sets = decode_all(resp, config::load_assignment)?;
        for (name, _) in &sets {
            s.awaiting.remove(&(t.to_owned(), name.clone()));
        }
        proxy.apply(Update::Endpoints(sets))?;
    } else if t == config::tls::secret_type_url() {
        let bundles = decode_all(resp, config::tls::bundle)?;
        for (name, bundle) in bundles {
            let key = (t.to_owned(), name.clone());
            proxy.apply(Update::TrustBundle { name, bundle })?;
            s.awaiting.remove(&key);
        }
    } else {
        return Err(ConfigError::UnsupportedType(t.to_owned()));
    }
    Ok(())
}

/// Ends a task when the session that started it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
