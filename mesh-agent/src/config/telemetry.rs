//! Istio's `telemetry.istio.io` Telemetry (v1 and v1alpha1 share one schema): metrics
//! overrides, access logging and tracing at mesh (root namespace), namespace and
//! workload (`selector`) scope, typed as the API reference spells them and validated
//! as Istio's webhook does.
//!
//! What the agent cannot do is refused by field rather than accepted and ignored:
//! `targetRefs`, tag overrides and custom metrics (label sets are fixed: see
//! `telemetry.rs`), `reportingInterval` (Prometheus pulls), environment custom tags
//! (the node agent's environment is shared by every tenant, not the workload's), other
//! providers than the built-in ones, and filter expressions beyond comparisons of
//! `response.code`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::resource::Resource;
use super::schema::{AnyValue, Invalid};
use super::security::WorkloadSelector;

/// API versions accepted for Telemetry.
pub const TELEMETRY_VERSIONS: &[&str] = &["telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1"];

/// The metrics provider: the agents' Prometheus endpoint.
pub const PROMETHEUS: &str = "prometheus";
/// The access log provider: the agents' standard output (Istio's `envoy`).
pub const ENVOY: &str = "envoy";

/// `Telemetry`.
pub type Telemetry = Resource<TelemetrySpec>;

/// `Telemetry.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelemetrySpec {
    /// The workloads it applies to; none: every workload of its namespace (the whole
    /// mesh in the root namespace).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Not supported (waypoint and gateway targets): refused.
    #[serde(default)]
    pub target_ref: Option<AnyValue>,
    /// Not supported: refused.
    #[serde(default)]
    pub target_refs: Option<AnyValue>,
    /// Tracing settings.
    #[serde(default)]
    pub tracing: Vec<Tracing>,
    /// Metrics settings.
    #[serde(default)]
    pub metrics: Vec<Metrics>,
    /// Access log settings.
    #[serde(default)]
    pub access_logging: Vec<AccessLogging>,
}

/// A provider by name.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderRef {
    /// The provider's name.
    pub name: String,
}

/// Which side's traffic a setting applies to.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModeSelector {
    /// `CLIENT_AND_SERVER` (default), `CLIENT` (the source's agent) or `SERVER` (the
    /// destination's).
    #[serde(default)]
    pub mode: Option<String>,
}

/// `spec.tracing[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    /// Which side.
    #[serde(default, rename = "match")]
    pub match_: Option<ModeSelector>,
    /// Where spans go: the agents' one exporter (`--trace-endpoint`), whatever the name.
    #[serde(default)]
    pub providers: Vec<ProviderRef>,
    /// Percent of new traces recorded.
    #[serde(default)]
    pub random_sampling_percentage: Option<f64>,
    /// Spans are not reported (context still propagates).
    #[serde(default)]
    pub disable_span_reporting: Option<bool>,
    /// Tags added to every span: `literal` or `header`.
    #[serde(default)]
    pub custom_tags: BTreeMap<String, CustomTag>,
    /// Not supported (sampling is random per trace): refused.
    #[serde(default)]
    pub use_request_id_for_trace_sampling: Option<AnyValue>,
}

/// `customTags.<name>`: exactly one source.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomTag {
    /// A fixed value.
    #[serde(default)]
    pub literal: Option<Literal>,
    /// A request header's value.
    #[serde(default)]
    pub header: Option<HeaderTag>,
    /// Refused: the node agent's environment is not the workload's.
    #[serde(default)]
    pub environment: Option<AnyValue>,
}

/// `customTags.<name>.literal`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Literal {
    /// The value.
    pub value: String,
}

/// `customTags.<name>.header`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderTag {
    /// The request header.
    pub name: String,
    /// The value when the request has no such header.
    #[serde(default)]
    pub default_value: Option<String>,
}

/// `spec.metrics[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metrics {
    /// `prometheus` only.
    #[serde(default)]
    pub providers: Vec<ProviderRef>,
    /// What to turn off.
    #[serde(default)]
    pub overrides: Vec<MetricsOverride>,
    /// Refused: Prometheus pulls.
    #[serde(default)]
    pub reporting_interval: Option<AnyValue>,
}

/// `spec.metrics[].overrides[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsOverride {
    /// Which metric and side; none: all metrics, both sides.
    #[serde(default, rename = "match")]
    pub match_: Option<MetricSelector>,
    /// Whether the metric is off.
    #[serde(default)]
    pub disabled: Option<bool>,
    /// Refused: label sets are fixed.
    #[serde(default)]
    pub tag_overrides: Option<AnyValue>,
}

/// `overrides[].match`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricSelector {
    /// `ALL_METRICS`, `REQUEST_COUNT`, `REQUEST_DURATION`, `REQUEST_SIZE`,
    /// `RESPONSE_SIZE`, `TCP_OPENED_CONNECTIONS`, `TCP_CLOSED_CONNECTIONS`,
    /// `TCP_SENT_BYTES`, `TCP_RECEIVED_BYTES`, `GRPC_REQUEST_MESSAGES`,
    /// `GRPC_RESPONSE_MESSAGES`.
    #[serde(default)]
    pub metric: Option<String>,
    /// Refused: custom metrics.
    #[serde(default)]
    pub custom_metric: Option<String>,
    /// Which side.
    #[serde(default)]
    pub mode: Option<String>,
}

/// `spec.accessLogging[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogging {
    /// Which side.
    #[serde(default, rename = "match")]
    pub match_: Option<ModeSelector>,
    /// `envoy` only (standard output).
    #[serde(default)]
    pub providers: Vec<ProviderRef>,
    /// Whether access logs are off.
    #[serde(default)]
    pub disabled: Option<bool>,
    /// Which entries are written.
    #[serde(default)]
    pub filter: Option<Filter>,
}

/// `accessLogging[].filter`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// A CEL expression; this agent reads comparisons of `response.code` with a number
    /// (`>=`, `>`, `<=`, `<`, `==`, `!=`) joined by `&&` and `||`.
    pub expression: String,
}

/// Custom tags one tracing setting may add: the shared agent copies each into every
/// span of the workloads it covers.
pub const MAX_CUSTOM_TAGS: usize = 16;

/// The longest custom tag value kept (longer header values are cut).
pub const MAX_TAG_VALUE: usize = 256;

/// The metrics a Telemetry can name, in the order of [`metric_index`].
pub const METRICS: [&str; 10] = [
    "REQUEST_COUNT",
    "REQUEST_DURATION",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "TCP_OPENED_CONNECTIONS",
    "TCP_CLOSED_CONNECTIONS",
    "TCP_SENT_BYTES",
    "TCP_RECEIVED_BYTES",
    "GRPC_REQUEST_MESSAGES",
    "GRPC_RESPONSE_MESSAGES",
];

/// The index of a metric name in [`METRICS`].
pub fn metric_index(name: &str) -> Option<usize> {
    METRICS.iter().position(|m| *m == name)
}

/// `(client, server)` for a `mode`.
pub fn sides(mode: Option<&str>) -> Result<(bool, bool), String> {
    match mode.unwrap_or("CLIENT_AND_SERVER") {
        "CLIENT_AND_SERVER" => Ok((true, true)),
        "CLIENT" => Ok((true, false)),
        "SERVER" => Ok((false, true)),
        other => Err(format!("{other:?} is not CLIENT_AND_SERVER, CLIENT or SERVER")),
    }
}

/// A comparison operator of a filter expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `>=`
    Ge,
    /// `>`
    Gt,
    /// `<=`
    Le,
    /// `<`
    Lt,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl Cmp {
    /// Whether `a <op> b`.
    pub fn holds(self, a: u16, b: u16) -> bool {
        match self {
            Cmp::Ge => a >= b,
            Cmp::Gt => a > b,
            Cmp::Le => a <= b,
            Cmp::Lt => a < b,
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
        }
    }
}

/// A filter expression: any of the groups holds when all its comparisons of the
/// response code hold.
pub type CodeFilter = Vec<Vec<(Cmp, u16)>>;

/// Reads a filter expression this agent understands, or says why not.
pub fn parse_filter(expression: &str) -> Result<CodeFilter, String> {
    const OPS: [(&str, Cmp); 6] =
        [(">=", Cmp::Ge), ("<=", Cmp::Le), ("==", Cmp::Eq), ("!=", Cmp::Ne), (">", Cmp::Gt), ("<", Cmp::Lt)];
    let unsupported = || {
        format!("{expression:?}: only comparisons of response.code with a number, joined by && and ||, are supported")
    };
    expression
        .split("||")
        .map(|group| {
            group
                .split("&&")
                .map(|cmp| {
                    let cmp = cmp.trim();
                    let rest = cmp.strip_prefix("response.code").ok_or_else(unsupported)?.trim_start();
                    let (op, n) = OPS
                        .iter()
                        .find_map(|(s, op)| rest.strip_prefix(s).map(|n| (*op, n.trim())))
                        .ok_or_else(unsupported)?;
                    Ok((op, n.parse::<u16>().map_err(|_| unsupported())?))
                })
                .collect()
        })
        .collect()
}

fn providers(field: &str, list: &[ProviderRef], allowed: &[&str]) -> Result<(), Invalid> {
    for (i, p) in list.iter().enumerate() {
        if !allowed.contains(&p.name.as_str()) {
            return Err((
                format!("{field}.providers[{i}].name"),
                format!("provider {:?} is not available; this mesh has {}", p.name, allowed.join(", ")),
            ));
        }
    }
    Ok(())
}

impl TelemetrySpec {
    /// The checks Istio's webhook makes, and refusals of what this agent cannot do.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.target_ref.is_some() || self.target_refs.is_some() {
            let field = if self.target_ref.is_some() { "spec.targetRef" } else { "spec.targetRefs" };
            return Err((field.into(), "not supported: select workloads with spec.selector".into()));
        }
        for (i, t) in self.tracing.iter().enumerate() {
            let at = format!("spec.tracing[{i}]");
            sides(t.match_.as_ref().and_then(|m| m.mode.as_deref())).map_err(|e| (format!("{at}.match.mode"), e))?;
            if let Some(p) = t.random_sampling_percentage
                && !(0.0..=100.0).contains(&p)
            {
                return Err((format!("{at}.randomSamplingPercentage"), format!("{p} is not between 0 and 100")));
            }
            if t.use_request_id_for_trace_sampling.is_some() {
                return Err((
                    format!("{at}.useRequestIdForTraceSampling"),
                    "not supported: traces are sampled at random, per trace".into(),
                ));
            }
            if t.custom_tags.len() > MAX_CUSTOM_TAGS {
                return Err((
                    format!("{at}.customTags"),
                    format!("{} tags; at most {MAX_CUSTOM_TAGS} (each is copied into every span)", t.custom_tags.len()),
                ));
            }
            for (name, tag) in &t.custom_tags {
                let field = format!("{at}.customTags.{name}");
                if name.is_empty() {
                    return Err((format!("{at}.customTags"), "a tag needs a name".into()));
                }
                if tag.environment.is_some() {
                    return Err((
                        format!("{field}.environment"),
                        "not supported: the node agent's environment is shared by every workload, not this one's"
                            .into(),
                    ));
                }
                match (&tag.literal, &tag.header) {
                    (Some(_), None) => {}
                    (None, Some(h)) if http::HeaderName::try_from(h.name.as_str()).is_ok() => {}
                    (None, Some(h)) => {
                        return Err((format!("{field}.header.name"), format!("{:?} is not a header name", h.name)));
                    }
                    _ => return Err((field, "exactly one of literal or header is required".into())),
                }
            }
        }
        for (i, m) in self.metrics.iter().enumerate() {
            let at = format!("spec.metrics[{i}]");
            providers(&at, &m.providers, &[PROMETHEUS])?;
            if m.reporting_interval.is_some() {
                return Err((format!("{at}.reportingInterval"), "not supported: Prometheus scrapes the agents".into()));
            }
            for (j, o) in m.overrides.iter().enumerate() {
                let at = format!("{at}.overrides[{j}]");
                if o.tag_overrides
                    .as_ref()
                    .is_some_and(|t| !matches!(&t.0, serde_yaml::Value::Mapping(m) if m.is_empty()))
                {
                    return Err((
                        format!("{at}.tagOverrides"),
                        "not supported: the standard metrics keep Istio's label set".into(),
                    ));
                }
                let Some(sel) = &o.match_ else { continue };
                if sel.custom_metric.is_some() {
                    return Err((format!("{at}.match.customMetric"), "not supported: custom metrics".into()));
                }
                if let Some(metric) = &sel.metric
                    && metric != "ALL_METRICS"
                    && metric_index(metric).is_none()
                {
                    return Err((
                        format!("{at}.match.metric"),
                        format!("{metric:?} is not ALL_METRICS or one of {}", METRICS.join(", ")),
                    ));
                }
                sides(sel.mode.as_deref()).map_err(|e| (format!("{at}.match.mode"), e))?;
            }
        }
        for (i, a) in self.access_logging.iter().enumerate() {
            let at = format!("spec.accessLogging[{i}]");
            providers(&at, &a.providers, &[ENVOY])?;
            sides(a.match_.as_ref().and_then(|m| m.mode.as_deref())).map_err(|e| (format!("{at}.match.mode"), e))?;
            if let Some(f) = &a.filter {
                parse_filter(&f.expression).map_err(|e| (format!("{at}.filter.expression"), e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> TelemetrySpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn what_cannot_be_done_is_refused_with_the_field() {
        let refused = [
            ("targetRefs: [{kind: Gateway, name: gw}]", "spec.targetRefs"),
            ("tracing: [{randomSamplingPercentage: 101}]", "spec.tracing[0].randomSamplingPercentage"),
            ("tracing: [{match: {mode: BOTH}}]", "spec.tracing[0].match.mode"),
            ("tracing: [{useRequestIdForTraceSampling: true}]", "spec.tracing[0].useRequestIdForTraceSampling"),
            (
                "tracing: [{customTags: {pod: {environment: {name: POD_NAME}}}}]",
                "spec.tracing[0].customTags.pod.environment",
            ),
            ("tracing: [{customTags: {x: {}}}]", "spec.tracing[0].customTags.x"),
            (
                "tracing: [{customTags: {a: {literal: {value: x}}, b: {literal: {value: x}}, c: {literal: {value: x}}, d: {literal: {value: x}}, e: {literal: {value: x}}, f: {literal: {value: x}}, g: {literal: {value: x}}, h: {literal: {value: x}}, i: {literal: {value: x}}, j: {literal: {value: x}}, k: {literal: {value: x}}, l: {literal: {value: x}}, m: {literal: {value: x}}, n: {literal: {value: x}}, o: {literal: {value: x}}, p: {literal: {value: x}}, q: {literal: {value: x}}}}]",
                "spec.tracing[0].customTags",
            ),
            (
                "tracing: [{customTags: {x: {header: {name: 'bad header'}}}}]",
                "spec.tracing[0].customTags.x.header.name",
            ),
            ("metrics: [{providers: [{name: stackdriver}]}]", "spec.metrics[0].providers[0].name"),
            ("metrics: [{reportingInterval: 5s}]", "spec.metrics[0].reportingInterval"),
            (
                "metrics: [{overrides: [{tagOverrides: {request_host: {value: request.host}}}]}]",
                "spec.metrics[0].overrides[0].tagOverrides",
            ),
            ("metrics: [{overrides: [{match: {metric: REQUESTS}}]}]", "spec.metrics[0].overrides[0].match.metric"),
            ("metrics: [{overrides: [{match: {customMetric: x}}]}]", "spec.metrics[0].overrides[0].match.customMetric"),
            ("accessLogging: [{providers: [{name: otel}]}]", "spec.accessLogging[0].providers[0].name"),
            (
                "accessLogging: [{filter: {expression: 'request.path == \"/\"'}}]",
                "spec.accessLogging[0].filter.expression",
            ),
        ];
        for (yaml, field) in refused {
            let err = spec(yaml).validate().expect_err(yaml);
            assert_eq!(err.0, field, "{yaml}: {err:?}");
        }
        let accepted = [
            "accessLogging: [{providers: [{name: envoy}]}]",
            "metrics: [{providers: [{name: prometheus}], overrides: [{match: {metric: ALL_METRICS, mode: CLIENT}, disabled: true}]}]",
            "tracing: [{randomSamplingPercentage: 10, customTags: {team: {literal: {value: a}}}}]",
            "selector: {matchLabels: {app: web}}\naccessLogging: [{disabled: true}]",
        ];
        for yaml in accepted {
            spec(yaml).validate().unwrap_or_else(|e| panic!("{yaml}: {e:?}"));
        }
        let unknown: Result<TelemetrySpec, _> = serde_yaml::from_str("tracing: [{samplingRate: 5}]");
        assert!(unknown.unwrap_err().to_string().contains("samplingRate"), "unknown fields are named");
    }

    #[test]
    fn filters_read_response_code_comparisons() {
        let f = parse_filter("response.code >= 400 && response.code != 404 || response.code == 200").unwrap();
        let holds = |code: u16| f.iter().any(|all| all.iter().all(|(op, n)| op.holds(code, *n)));
        assert!(holds(500) && holds(200) && !holds(404) && !holds(302));
        for bad in ["response.flags != \"-\"", "response.code >= x", "request.path == \"/\"", "response.code ~ 4"] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }
}
