//! The report service ([`weft_api::report`]), served beside ADS on the control plane's TLS
//! listener: each weft proxy opens a stream on the connection it holds for xDS, proves which
//! proxy it is, then sends its counts and tap events, which go to [`crate::traffic`].
use crate::state::Mesh;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_api::report::proxy_reports_server::{ProxyReports, ProxyReportsServer};
use weft_api::report::{ControlMessage, ProxyMessage, proxy_message};

pub fn server(mesh: Arc<Mesh>) -> ProxyReportsServer<Reports> {
    ProxyReportsServer::new(Reports { mesh })
}

pub struct Reports {
    mesh: Arc<Mesh>,
}

#[tonic::async_trait]
impl ProxyReports for Reports {
    type ReportStream = ReceiverStream<Result<ControlMessage, Status>>;

    async fn report(&self, req: Request<Streaming<ProxyMessage>>) -> Result<Response<Self::ReportStream>, Status> {
        let token = crate::xds::bearer(req.metadata());
        self.mesh
            .security
            .check_token("report", token.as_deref(), None)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await?.and_then(|m| m.kind) {
            Some(proxy_message::Kind::Hello(h)) => h,
            _ => return Err(Status::invalid_argument("a report stream opens with a Hello")),
        };
        // Only the proxy that registered an instance reports for it.
        if !self.mesh.owns(&hello.node, &hello.instance_key) {
            return Err(Status::permission_denied(format!(
                "instance {:?} is not registered by this proxy (open the xDS stream first)",
                hello.node
            )));
        }
        let (orders, rx) = mpsc::channel(64);
        let traffic = self.mesh.traffic.clone();
        let node = hello.node;
        let session = traffic.connected(&node, orders);
        tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                match msg.kind {
                    Some(proxy_message::Kind::Stats(s)) => traffic.stats(&node, session, s.edges),
                    Some(proxy_message::Kind::Tap(t)) => traffic.tap_events(t.events, t.dropped),
                    Some(proxy_message::Kind::Hello(_)) | None => {}
                }
            }
            traffic.disconnected(&node, session);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
