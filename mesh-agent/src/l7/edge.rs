//! What a gateway does to a request from outside the mesh before it is routed, as
//! Istio's gateway does (Envoy with `use_remote_address` and no trusted hops): the
//! request is judged under the AuthorizationPolicies that select the gateway's pod, its
//! path is normalized the way the policy read it, headers only the mesh may set are
//! dropped, and the forwarding headers say who sent it, over what, under a request id
//! the client did not choose.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};

use crate::authz::head::{self, BadHead};
use crate::authz::{ConnAttrs, Decision, Peer, RBAC_DENIED, RequestAttrs};
use crate::snapshot::Snapshot;
use crate::state::Workload;
use crate::telemetry::{DenyReason, Metrics};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_ENVOY_EXTERNAL_ADDRESS: HeaderName = HeaderName::from_static("x-envoy-external-address");
const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// A request the gateway answers itself instead of routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The status.
    pub status: StatusCode,
    /// Envoy's response flag for it.
    pub flags: &'static str,
    /// The plain-text body.
    pub body: &'static str,
}

/// One request arriving at a gateway.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    /// The configuration it is judged under.
    pub snapshot: &'a Snapshot,
    /// The gateway's own pod: the policies selecting it apply.
    pub gateway: &'a Workload,
    /// The client, as the gateway's socket sees it.
    pub client: SocketAddr,
    /// The gateway address and port it reached.
    pub local: SocketAddr,
    /// Whether the gateway terminated TLS for it.
    pub tls: bool,
    /// The client as a mesh peer (ISTIO_MUTUAL servers): what `principals` match.
    pub peer: Option<&'a Peer>,
}

/// Judges `req` and prepares it for routing, or says how to refuse it.
pub fn admit<B>(at: &Arrival<'_>, metrics: &Metrics, req: &mut Request<B>) -> Result<(), Refusal> {
    let judged = head::judge(req.method(), req.uri(), req.headers()).map_err(|e| {
        let body = match e {
            BadHead::LowerCaseMethod => "method must be upper case\n",
            BadHead::Path(_) => "invalid request path\n",
            BadHead::Target => "invalid request target\n",
        };
        Refusal { status: StatusCode::BAD_REQUEST, flags: "DPE", body }
    })?;
    let attrs = ConnAttrs { src: at.client, dst: at.local, peer: at.peer };
    let request = RequestAttrs {
        method: req.method().as_str(),
        path: &judged.path,
        host_lowercase: &judged.host_lowercase,
        headers: req.headers(),
    };
    if let Decision::Deny(reason) = at.snapshot.security(&at.gateway.key()).authz.check(&attrs, Some(&request)) {
        tracing::info!(
            gateway = %at.gateway.name, client = %at.client, method = %req.method(), path = %judged.path, %reason,
            "denied by authorization policy"
        );
        metrics.denied(at.gateway, DenyReason::HttpPolicy, attrs.client(), &reason);
        return Err(Refusal { status: StatusCode::FORBIDDEN, flags: "RBAC", body: RBAC_DENIED });
    }
    *req.uri_mut() = judged.target;
    set_forwarding_headers(req.headers_mut(), at.client.ip(), at.tls);
    Ok(())
}

/// The headers of a request entering the mesh: `x-envoy-*` and the client-certificate
/// header come only from the mesh, so a client's own are dropped; the client's address
/// is appended to `x-forwarded-for` and is the `x-envoy-external-address`; the scheme
/// is the one the gateway served; the request id is new.
pub fn set_forwarding_headers(headers: &mut HeaderMap, client: IpAddr, tls: bool) {
    let internal: Vec<HeaderName> = headers.keys().filter(|n| n.as_str().starts_with("x-envoy-")).cloned().collect();
    for name in internal {
        headers.remove(name);
    }
    headers.remove(X_FORWARDED_CLIENT_CERT);
    let client = client.to_canonical().to_string();
    let forwarded_for =
        match headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>() {
            earlier if earlier.is_empty() => client.clone(),
            earlier => format!("{},{client}", earlier.join(",")),
        };
    // Values made of a header that parsed and an address always parse again; should
    // one not, the client's own value is dropped rather than passed on unextended.
    match HeaderValue::try_from(forwarded_for) {
        Ok(v) => headers.insert(X_FORWARDED_FOR, v),
        Err(_) => {
            headers.insert(X_FORWARDED_FOR, HeaderValue::from_str(&client).expect("an IP address is a header value"))
        }
    };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if tls { "https" } else { "http" }));
    headers.insert(X_ENVOY_EXTERNAL_ADDRESS, HeaderValue::from_str(&client).expect("an IP address is a header value"));
    headers.insert(X_REQUEST_ID, crate::telemetry::trace::new_request_id());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_headers_extend_what_the_client_sent_and_replace_what_only_the_mesh_sets() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(X_REQUEST_ID, HeaderValue::from_static("chosen-by-client"));
        h.insert(X_ENVOY_EXTERNAL_ADDRESS, HeaderValue::from_static("10.0.0.1"));
        h.insert("x-envoy-upstream-rq-timeout-ms", HeaderValue::from_static("1"));
        h.insert(X_FORWARDED_CLIENT_CERT, HeaderValue::from_static("By=spiffe://cluster.local/ns/a/sa/admin"));
        set_forwarding_headers(&mut h, "::ffff:192.0.2.7".parse().unwrap(), false);
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_FOR], "203.0.113.9,198.51.100.1,192.0.2.7");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_ENVOY_EXTERNAL_ADDRESS], "192.0.2.7");
        assert!(h.get("x-envoy-upstream-rq-timeout-ms").is_none());
        assert!(h.get(X_FORWARDED_CLIENT_CERT).is_none());
        let id = h[X_REQUEST_ID].to_str().unwrap();
        assert_ne!(id, "chosen-by-client");
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4', "version 4: {id}");
        let mut again = HeaderMap::new();
        set_forwarding_headers(&mut again, "192.0.2.7".parse().unwrap(), true);
        assert_ne!(again[X_REQUEST_ID], h[X_REQUEST_ID]);
        assert_eq!(again[X_FORWARDED_FOR], "192.0.2.7");
        assert_eq!(again[X_FORWARDED_PROTO], "https");
    }
}
