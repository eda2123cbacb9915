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

    /// The value of the first of `keys` the Secret `name` holds.
    pub fn field(&self, name: &str, keys: &[&str]) -> Result<Option<Vec<u8>>, String> {
        let secret = self.get(name)?;
        for k in keys {
            if let Some(v) = secret.value(k).map_err(|e| format!("Secret {name}: {e}"))? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// The CA certificates of the Secret `name` (the first of `keys` it holds), else
    /// those of the Secret `<name>-cacert`, as Istio reads them.
    pub fn ca(&self, name: &str, keys: &[&str]) -> Result<Option<Vec<u8>>, String> {
        if let Some(ca) = self.field(name, keys)? {
            return Ok(Some(ca));
        }
        let separate = format!("{name}-cacert");
        if self.0.contains_key(&separate) { self.field(&separate, keys) } else { Ok(None) }
    }
}
