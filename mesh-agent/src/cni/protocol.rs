//! What crosses the agent's CNI socket: one request (JSON, with the pod's network
//! namespace as an `SCM_RIGHTS` fd for `ADD`), one reply (JSON line). Both ends are
//! root on the same node; the socket is the agent's and mode 0600.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The largest request the agent reads: a pod's UID, name, namespace and a few
/// addresses fit many times over, and nothing a peer sends makes the agent buffer more.
pub const MAX_REQUEST: usize = 16 * 1024;

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "UPPERCASE")]
pub enum Request {
    /// A pod's sandbox is being created; its netns fd comes with the message.
    Add {
        /// `metadata.uid` (`K8S_POD_UID`).
        uid: String,
        /// `K8S_POD_NAMESPACE`.
        namespace: String,
        /// `K8S_POD_NAME`.
        name: String,
        /// The addresses the network plugin gave it (`prevResult.ips`).
        ips: Vec<IpAddr>,
    },
    /// A pod's sandbox is being torn down.
    Del {
        /// `metadata.uid`.
        uid: String,
    },
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Reply {
    /// Captured: listeners bound, kernel programs attached. The pod may start.
    Enrolled,
    /// Not in the mesh (namespace not enrolled, opted out, hostNetwork): nothing to do.
    NotInMesh {
        /// Why, for the plugin's log.
        reason: String,
    },
    /// The pod must not start: it should be captured and is not.
    Failed {
        /// Why.
        reason: String,
    },
    /// `DEL` done.
    Removed,
}

impl Request {
    /// The JSON bytes sent.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a request always serializes")
    }

    /// Reads a request; its size is bounded by the caller's buffer.
    pub fn decode(bytes: &[u8]) -> Result<Self, super::Error> {
        serde_json::from_slice(bytes)
            .map_err(|e| super::Error::Invalid { what: "CNI request".into(), reason: e.to_string() })
    }
}

impl Reply {
    /// The JSON line sent.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("a reply always serializes");
        v.push(b'\n');
        v
    }

    /// Reads a reply line.
    pub fn decode(bytes: &[u8]) -> Result<Self, super::Error> {
        serde_json::from_slice(bytes)
            .map_err(|e| super::Error::Invalid { what: "agent reply".into(), reason: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_in_a_stable_spelling() {
        let add = Request::Add {
            uid: "5c1b7a8e-0d2f-4a61-9f31-6b2e1e0c9a77".into(),
            namespace: "production".into(),
            name: "web".into(),
            ips: vec!["10.10.1.5".parse().unwrap()],
        };
        let text = String::from_utf8(add.encode()).unwrap();
        assert!(text.starts_with(r#"{"command":"ADD","uid":"5c1b7a8e"#), "{text}");
        assert_eq!(Request::decode(text.as_bytes()).unwrap(), add);
        let r = Reply::Failed { reason: "no cgroup".into() };
        assert_eq!(String::from_utf8(r.encode()).unwrap(), "{\"result\":\"failed\",\"reason\":\"no cgroup\"}\n");
        assert_eq!(Reply::decode(&r.encode()).unwrap(), r);
        assert!(Request::decode(b"{\"command\":\"ADD\"}").is_err());
    }
}
