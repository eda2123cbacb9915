//! Who is asking: the node a caller's token belongs to.
//!
//! In the lab, a file of per-node tokens (as kube-apiserver's `--token-auth-file`). In a
//! cluster, the token goes to the API server's TokenReview, must be a trusted node
//! agent's service account, and must be bound to a pod (projected tokens are): that
//! pod's node is the caller's node. The token itself is never logged.

use std::collections::HashMap;
use std::path::Path;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The node it runs on.
    pub node: String,
    /// What it authenticated as (for logs): `node-token:<node>` or the service account.
    pub account: String,
    /// A gateway (or other workload that holds its own identity): the only identity it
    /// may ask for, as `(namespace, service account)`. None for a node agent, which asks
    /// for the pods of its node.
    pub own_identity: Option<(String, String)>,
}

/// Tells which node a token belongs to.
pub enum Authenticator {
    /// SHA-256 of each token -> the caller it names.
    Static(HashMap<[u8; 32], Caller>),
    /// TokenReview, for these agent accounts and this audience.
    Kube {
        /// API client.
        client: kube::Client,
        /// `system:serviceaccount:<ns>:<name>` of the node agents.
        trusted: Vec<String>,
        /// `system:serviceaccount:<ns>:<name>` of gateways, which get their own identity.
        gateways: Vec<String>,
        /// The token audience.
        audience: String,
    },
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print token digests either.
        match self {
            Authenticator::Static(m) => f.debug_struct("Static").field("tokens", &m.len()).finish(),
            Authenticator::Kube { trusted, gateways, audience, .. } => f
                .debug_struct("Kube")
                .field("trusted", trusted)
                .field("gateways", gateways)
                .field("audience", audience)
                .finish(),
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Authenticator {
    /// Reads `<token> <node>` lines for node agents and `<token> <node>
    /// <namespace>/<serviceaccount>` lines for gateways on that node (`#` comments,
    /// blank lines allowed).
    pub fn from_token_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut tokens = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut f = line.split_whitespace();
            let bad = || {
                format!("{}: line {}: expected `<token> <node> [<namespace>/<serviceaccount>]`", path.display(), n + 1)
            };
            let caller = match (f.next(), f.next(), f.next(), f.next()) {
                (Some(token), Some(node), None, None) => {
                    (token, Caller { node: node.into(), account: format!("node-token:{node}"), own_identity: None })
                }
                (Some(token), Some(node), Some(account), None) => {
                    let (ns, sa) = account.split_once('/').ok_or_else(bad)?;
                    let own_identity = Some((ns.to_string(), sa.to_string()));
                    (token, Caller { node: node.into(), account: format!("workload-token:{account}"), own_identity })
                }
                _ => return Err(bad()),
            };
            tokens.insert(digest(caller.0), caller.1);
        }
        Ok(Authenticator::Static(tokens))
    }

    /// The caller `token` belongs to, or why it is refused.
    pub async fn caller(&self, token: &str) -> Result<Caller, String> {
        match self {
            Authenticator::Static(tokens) => {
                tokens.get(&digest(token)).cloned().ok_or_else(|| "unknown token".to_string())
            }
            Authenticator::Kube { client, trusted, gateways, audience } => {
                review(client, trusted, gateways, audience, token).await
            }
        }
    }
}

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

async fn review(
    client: &kube::Client,
    trusted: &[String],
    gateways: &[String],
    audience: &str,
    token: &str,
) -> Result<Caller, String> {
    let review = TokenReview {
        spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![audience.to_string()]) },
        ..Default::default()
    };
    let api: Api<TokenReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await.map_err(|e| format!("TokenReview failed: {e}"))?;
    let status = answer.status.ok_or("TokenReview answered without a status")?;
    if status.authenticated != Some(true) {
        return Err(format!("token not authenticated: {}", status.error.unwrap_or_default()));
    }
    let user = status.user.ok_or("TokenReview answered without a user")?;
    let account = user.username.unwrap_or_default();
    let own_identity = if trusted.contains(&account) {
        None
    } else if gateways.contains(&account) {
        let mut parts = account.strip_prefix("system:serviceaccount:").unwrap_or("").splitn(2, ':');
        parts.next().zip(parts.next()).map(|(ns, sa)| (ns.to_string(), sa.to_string()))
    } else {
        return Err(format!("{account} is not a node agent's or a gateway's account"));
    };
    let extra = user.extra.unwrap_or_default();
    let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    // The pod the token is bound to: its node is the caller's. Kubernetes 1.30+ names
    // the node in the token too; the pod is checked either way (it must still exist,
    // with the UID the token names).
    let (Some(pod_name), Some(pod_uid)) = (first(POD_NAME), first(POD_UID)) else {
        return Err("the token is not bound to a pod: mount a projected service-account token".into());
    };
    let namespace = account.strip_prefix("system:serviceaccount:").and_then(|r| r.split(':').next()).unwrap_or("");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = pods.get(&pod_name).await.map_err(|e| format!("the token's pod {namespace}/{pod_name}: {e}"))?;
    if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
        return Err(format!("the token's pod {namespace}/{pod_name} no longer exists (uid changed)"));
    }
    let node = pod.spec.and_then(|s| s.node_name).ok_or("the token's pod is not scheduled")?;
    if let Some(claimed) = first(NODE_NAME)
        && claimed != node
    {
        return Err(format!("the token names node {claimed}, its pod runs on {node}"));
    }
    Ok(Caller { node, account, own_identity })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_tokens_name_their_node_and_nothing_else_passes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# lab agents\nsecret-one node1\n\nsecret-two node2\n").unwrap();
        let auth = Authenticator::from_token_file(&file).unwrap();
        assert_eq!(auth.caller("secret-two").await.unwrap().node, "node2");
        assert!(auth.caller("secret-three").await.is_err());
        assert!(auth.caller("").await.is_err());
        assert!(!format!("{auth:?}").contains("secret"), "tokens never printed");
        std::fs::write(&file, "gw-secret node1 istio-ingress/istio-ingressgateway\n").unwrap();
        let gateway = Authenticator::from_token_file(&file).unwrap().caller("gw-secret").await.unwrap();
        assert_eq!(gateway.own_identity, Some(("istio-ingress".into(), "istio-ingressgateway".into())));
        assert_eq!(gateway.node, "node1");
        std::fs::write(&file, "lonely-token\n").unwrap();
        assert!(Authenticator::from_token_file(&file).unwrap_err().contains("line 1"));
    }
}
