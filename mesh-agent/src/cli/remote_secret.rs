//! `meshctl x create-remote-secret`: a Secret that lets another cluster's agents read
//! this one, as `istioctl x create-remote-secret` prints it. It holds a kubeconfig for
//! this cluster's API server whose user is the install's `mesh-reader` service
//! account, which may only read what the agents' config comes from; it is labelled
//! `istio/multiCluster: "true"` and names the cluster in the
//! `networking.istio.io/cluster` annotation.

use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

use super::cluster::{PART_OF, api_error};
use super::manifest::READER;

/// The Secret holding the reader's token, created on demand as istioctl does.
const TOKEN_SECRET: &str = "mesh-reader-token";
/// How long the cluster's token controller gets to fill that Secret.
const TOKEN_WAIT: Duration = Duration::from_secs(10);

/// Errors of `create-remote-secret`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig or the context in it.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// The cluster name cannot name a Secret.
    #[error(
        "--name {0:?}: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 63"
    )]
    BadName(String),
    /// An API call.
    #[error(transparent)]
    Cluster(#[from] super::cluster::Error),
    /// The install's reader account is missing.
    #[error(
        "no ServiceAccount {namespace}/{READER} in context {context}: install the mesh there first (`meshctl install`)"
    )]
    NotInstalled {
        /// The context.
        context: String,
        /// The install's namespace.
        namespace: String,
    },
    /// The token controller did not fill the token Secret.
    #[error("Secret {namespace}/{TOKEN_SECRET} got no token within {TOKEN_WAIT:?}: is the token controller running?")]
    NoToken {
        /// The install's namespace.
        namespace: String,
    },
}

/// A context of the user's kubeconfig: a client for it, and how another cluster
/// reaches the same API server.
pub struct Context {
    /// Its name.
    pub name: String,
    /// A client on its credentials.
    pub client: kube::Client,
    /// The API server's address as the kubeconfig names it.
    pub server: String,
    /// The API server's CA (base64 PEM), where the kubeconfig names one.
    pub ca_data: Option<String>,
}

impl Context {
    /// `name` in the user's kubeconfig, or its current context.
    pub async fn load(name: Option<&str>) -> Result<Self, Error> {
        let bad = |e: String| Error::Kubeconfig(e);
        let kubeconfig = Kubeconfig::read().map_err(|e| bad(e.to_string()))?;
        let name = name
            .map(str::to_string)
            .or_else(|| kubeconfig.current_context.clone())
            .ok_or_else(|| bad("no current context; pass --context".into()))?;
        let context = kubeconfig
            .contexts
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.context.as_ref())
            .ok_or_else(|| bad(format!("no context {name:?}")))?;
        let cluster = kubeconfig
            .clusters
            .iter()
            .find(|c| c.name == context.cluster)
            .and_then(|c| c.cluster.as_ref())
            .ok_or_else(|| {
            bad(format!("context {name:?} names cluster {:?}, which is not there", context.cluster))
        })?;
        let server =
            cluster.server.clone().ok_or_else(|| bad(format!("cluster {:?} has no server", context.cluster)))?;
        let ca_data = match (&cluster.certificate_authority_data, &cluster.certificate_authority) {
            (Some(data), _) => Some(data.clone()),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| bad(format!("certificate-authority {path}: {e}")))?;
                Some(base64::engine::general_purpose::STANDARD.encode(pem))
            }
            (None, None) => None,
        };
        let options = KubeConfigOptions { context: Some(name.clone()), ..Default::default() };
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await.map_err(|e| bad(e.to_string()))?;
        config.default_retry = false;
        config.connect_timeout = Some(Duration::from_secs(10));
        config.read_timeout = Some(Duration::from_secs(60));
        let client = kube::Client::try_from(config).map_err(|e| bad(e.to_string()))?;
        Ok(Self { name, client, server, ca_data })
    }
}

/// The remote secret for `context`'s cluster, named `cluster` for the clusters that
/// apply it, as YAML. The reader account's token Secret is created if missing.
pub async fn create(context: &Context, cluster: &str, namespace: &str) -> Result<String, Error> {
    if !crate::state::is_cluster_name(cluster) {
        return Err(Error::BadName(cluster.into()));
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(context.client.clone(), namespace);
    let account = format!("ServiceAccount {namespace}/{READER}");
    match accounts.get_opt(READER).await.map_err(|e| api_error("get", &account, e))? {
        Some(_) => {}
        None => return Err(Error::NotInstalled { context: context.name.clone(), namespace: namespace.into() }),
    }
    let token = reader_token(&context.client, namespace).await?;
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": match &context.ca_data {
            Some(ca) => json!({"server": context.server, "certificate-authority-data": ca}),
            None => json!({"server": context.server}),
        }}],
        "users": [{"name": cluster, "user": {"token": token}}],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": cluster}}],
        "current-context": cluster,
    });
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": format!("istio-remote-secret-{cluster}"),
            "namespace": namespace,
            "annotations": {"networking.istio.io/cluster": cluster},
            "labels": {"istio/multiCluster": "true"},
        },
        "type": "Opaque",
        "stringData": {cluster: serde_yaml::to_string(&kubeconfig).expect("a kubeconfig serializes")},
    });
    Ok(serde_yaml::to_string(&secret).expect("a Secret serializes"))
}

/// The reader account's token: from its token Secret, created if missing and filled by
/// the cluster's token controller.
async fn reader_token(client: &kube::Client, namespace: &str) -> Result<String, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let label = format!("Secret {namespace}/{TOKEN_SECRET}");
    let existing = secrets.get_opt(TOKEN_SECRET).await.map_err(|e| api_error("get", &label, e))?;
    if existing.is_none() {
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(TOKEN_SECRET.into()),
                namespace: Some(namespace.into()),
                annotations: Some([("kubernetes.io/service-account.name".to_string(), READER.to_string())].into()),
                labels: Some([(PART_OF.0.to_string(), PART_OF.1.to_string())].into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/service-account-token".into()),
            ..Default::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {}
            // Created meanwhile by another client: the same Secret.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(Error::from(api_error("create", &label, e))),
        }
    }
    let deadline = Instant::now() + TOKEN_WAIT;
    loop {
        let secret = secrets.get_opt(TOKEN_SECRET).await.map_err(|e| api_error("get", &label, e))?;
        let token = secret.and_then(|s| s.data?.remove("token")).and_then(|t| String::from_utf8(t.0).ok());
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            return Ok(token);
        }
        if Instant::now() >= deadline {
            return Err(Error::NoToken { namespace: namespace.into() });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
