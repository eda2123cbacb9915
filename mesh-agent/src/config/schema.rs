//! How the config types describe themselves to the API server (the CRD schemas
//! `meshctl` generates from them): the two shapes schemars cannot infer.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Deserialize;
use serde_yaml::Value;

/// A field the mesh accepts as written and does not read: controllers' `status`, and
/// upstream fields the mesh leaves to other components. The API server keeps it as
/// written (`x-kubernetes-preserve-unknown-fields`).
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct AnyValue(pub Value);

impl std::fmt::Debug for AnyValue {
    // The config digest hashes `Debug` output: the wrapper must not show in it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl JsonSchema for AnyValue {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "AnyValue".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        any_value(generator)
    }
}

/// Schema of a field the mesh keeps as free-form YAML: anything goes.
pub fn any_value(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

/// Schema of a value written as an integer or a string (ports in map keys, quantities).
pub fn int_or_string(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "x-kubernetes-int-or-string": true })
}

/// A validation failure: (dotted field path, reason).
pub(super) type Invalid = (String, String);
