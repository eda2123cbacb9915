//! The Secrets a gateway reads: those of its own namespace, for the certificates of
//! its servers (`credentialName`) and of the TLS it originates (a DestinationRule's
//! `credentialName`). Node agents read none.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Object;
use crate::config::resources::Secret;

/// The Secrets a gateway may read: those of its own namespace, by name.
#[derive(Debug, Clone, Default)]
pub struct Secrets(HashMap<String, Arc<Secret>>);

impl Secrets {
    /// The Secrets of `namespace` among `objects`.
    pub fn of_namespace(objects: &[Object], namespace: &str) -> Self {
        Self(
            objects
                .iter()
                .filter_map(|o| match o {
                    Object::Secret(s) if s.metadata.namespace_or_default() == namespace => {
                        Some((s.metadata.name.clone(), Arc::new((**s).clone())))
                    }
                    _ => None,
                })
                .collect(),
        )
    }

    /// The Secret `name`; the error says it is missing from the gateway's namespace.
    pub fn get(&self, name: &str) -> Result<&Secret, String> {
        self.0.get(name).map(|s| &**s).ok_or_else(|| format!("no Secret {name:?} in the gateway's namespace"))
    }
}
