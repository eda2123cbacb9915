//! Linkerd `ServiceProfile` (linkerd.io/v1alpha2) and SMI `TrafficSplit`
//! (split.smi-spec.io/v1alpha1 to v1alpha4).

use super::resource::Resource;
use super::schema::AnyValue;
use serde::Deserialize;
use serde_yaml::Value;

use super::istio::{Invalid, valid_regex};

/// API versions of ServiceProfile.
pub const SERVICE_PROFILE_VERSIONS: &[&str] = &["linkerd.io/v1alpha2"];
/// API versions of TrafficSplit.
pub const TRAFFIC_SPLIT_VERSIONS: &[&str] = &[
    "split.smi-spec.io/v1alpha1",
    "split.smi-spec.io/v1alpha2",
    "split.smi-spec.io/v1alpha3",
    "split.smi-spec.io/v1alpha4",
];

/// `ServiceProfile`: named after the Service's FQDN.
pub type ServiceProfile = Resource<ServiceProfileSpec>;

/// `ServiceProfile.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceProfileSpec {
    /// Routes, first match wins.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Caps retries across all routes.
    #[serde(default)]
    pub retry_budget: Option<RetryBudget>,
    /// Traffic shifting (not enforced yet; use TrafficSplit).
    #[serde(default)]
    pub dst_overrides: Option<AnyValue>,
    /// OpenAPI source (informational).
    #[serde(default)]
    pub opaque_ports: Option<AnyValue>,
}

/// One route.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    /// Name, for metrics.
    pub name: String,
    /// When it applies.
    pub condition: RequestMatch,
    /// Which responses are failures.
    #[serde(default)]
    pub response_classes: Vec<ResponseClass>,
    /// Retry failures (under the budget).
    #[serde(default)]
    pub is_retryable: bool,
    /// Request timeout.
    #[serde(default)]
    pub timeout: Option<String>,
}

/// A request condition.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMatch {
    /// Method.
    #[serde(default)]
    pub method: Option<String>,
    /// Regex anchored at both ends, on the path.
    #[serde(default)]
    pub path_regex: Option<String>,
    /// All must match.
    #[serde(default)]
    pub all: Vec<RequestMatch>,
    /// Any must match.
    #[serde(default)]
    pub any: Vec<RequestMatch>,
    /// Must not match.
    #[serde(default)]
    pub not: Option<Box<RequestMatch>>,
}

/// A response class.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResponseClass {
    /// Which responses.
    pub condition: ResponseMatch,
    /// Failure or not.
    #[serde(default)]
    pub is_failure: bool,
}

/// A response condition.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResponseMatch {
    /// Status range.
    #[serde(default)]
    pub status: Option<StatusRange>,
    /// All must match.
    #[serde(default)]
    pub all: Vec<ResponseMatch>,
    /// Any must match.
    #[serde(default)]
    pub any: Vec<ResponseMatch>,
    /// Must not match.
    #[serde(default)]
    pub not: Option<Box<ResponseMatch>>,
}

/// `status: {min, max}` (inclusive; either may be absent).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusRange {
    /// Lowest.
    #[serde(default)]
    pub min: Option<u16>,
    /// Highest.
    #[serde(default)]
    pub max: Option<u16>,
}

/// `retryBudget`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries allowed per request, on average over `ttl`.
    pub retry_ratio: f64,
    /// Retries allowed per second whatever the request rate.
    pub min_retries_per_second: u32,
    /// Window.
    pub ttl: String,
}

/// SMI `TrafficSplit`.
pub type TrafficSplit = Resource<TrafficSplitSpec>;

/// `TrafficSplit.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrafficSplitSpec {
    /// The root Service clients dial.
    pub service: String,
    /// Services that take the traffic.
    pub backends: Vec<TrafficSplitBackend>,
    /// HTTPRouteGroup matches (not enforced yet).
    #[serde(default)]
    pub matches: Option<AnyValue>,
}

/// A backend.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrafficSplitBackend {
    /// Service name (same namespace).
    pub service: String,
    /// Kubernetes quantity (`900m`, `1`, `100`) in v1alpha1, an integer later.
    #[schemars(schema_with = "crate::config::schema::int_or_string")]
    pub weight: Value,
}

/// A Kubernetes quantity as thousandths: `900m` -> 900, `1` -> 1000, `1.5` -> 1500,
/// `2k` -> 2_000_000.
pub fn quantity_milli(v: &Value) -> Result<u64, String> {
    let s = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        other => return Err(format!("{other:?} is not a quantity")),
    };
    let (num, scale) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let factor = match &s[i..] {
                "m" => 1.0,
                "k" => 1e6,
                "M" => 1e9,
                "G" => 1e12,
                unit => return Err(format!("{s:?}: unknown quantity suffix {unit:?}")),
            };
            (&s[..i], factor)
        }
        None => (s.as_str(), 1000.0),
    };
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a quantity"))?;
    if n < 0.0 || !n.is_finite() {
        return Err(format!("{s:?} must be a finite quantity, not negative"));
    }
    Ok((n * scale).round() as u64)
}

fn validate_request_match(at: &str, m: &RequestMatch) -> Result<(), Invalid> {
    if let Some(r) = &m.path_regex {
        valid_regex(format!("{at}.pathRegex"), r)?;
    }
    for (i, sub) in m.all.iter().enumerate() {
        validate_request_match(&format!("{at}.all[{i}]"), sub)?;
    }
    for (i, sub) in m.any.iter().enumerate() {
        validate_request_match(&format!("{at}.any[{i}]"), sub)?;
    }
    if let Some(n) = &m.not {
        validate_request_match(&format!("{at}.not"), n)?;
    }
    Ok(())
}

impl ServiceProfile {
    /// Linkerd's checks.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.metadata.name.split('.').count() < 3 {
            return Err((
                "metadata.name".into(),
                format!("{:?} must be the Service's FQDN, e.g. myapp.production.svc.cluster.local", self.metadata.name),
            ));
        }
        if self.spec.dst_overrides.is_some() {
            return Err(("spec.dstOverrides".into(), "is not supported by this agent version yet".into()));
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.spec.routes.iter().enumerate() {
            let at = format!("spec.routes[{i}]");
            if !names.insert(r.name.as_str()) {
                return Err((format!("{at}.name"), format!("route {:?} is defined twice", r.name)));
            }
            validate_request_match(&format!("{at}.condition"), &r.condition)?;
            if let Some(t) = &r.timeout {
                super::istio::duration(&format!("{at}.timeout"), t)?;
            }
            for (j, c) in r.response_classes.iter().enumerate() {
                if let Some(s) = &c.condition.status
                    && let (Some(min), Some(max)) = (s.min, s.max)
                    && min > max
                {
                    return Err((
                        format!("{at}.responseClasses[{j}].condition.status"),
                        format!("min {min} > max {max}"),
                    ));
                }
            }
        }
        if let Some(b) = &self.spec.retry_budget {
            if !(0.0..=1000.0).contains(&b.retry_ratio) {
                return Err(("spec.retryBudget.retryRatio".into(), format!("{} must be >= 0", b.retry_ratio)));
            }
            super::istio::duration("spec.retryBudget.ttl", &b.ttl)?;
        }
        Ok(())
    }
}

impl TrafficSplit {
    /// SMI's checks: at least one backend, weights that are quantities, not all zero.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.spec.service.is_empty() {
            return Err(("spec.service".into(), "is required".into()));
        }
        if self.spec.matches.is_some() {
            return Err(("spec.matches".into(), "is not supported by this agent version yet".into()));
        }
        if self.spec.backends.is_empty() {
            return Err(("spec.backends".into(), "at least one backend is required".into()));
        }
        let mut total: u64 = 0;
        let mut names = std::collections::HashSet::new();
        for (i, b) in self.spec.backends.iter().enumerate() {
            total += quantity_milli(&b.weight).map_err(|e| (format!("spec.backends[{i}].weight"), e))?;
            // Weights are compiled into thousandths that must add up within 32 bits.
            if total > u64::from(u32::MAX) {
                return Err((
                    format!("spec.backends[{i}].weight"),
                    format!("weights add up to more than {}m", u32::MAX),
                ));
            }
            if !names.insert(b.service.as_str()) {
                return Err((format!("spec.backends[{i}].service"), format!("{:?} is listed twice", b.service)));
            }
        }
        if total == 0 {
            return Err(("spec.backends".into(), "weights add up to zero".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_as_thousandths() {
        let q = |s: &str| quantity_milli(&Value::String(s.into()));
        assert_eq!(q("900m"), Ok(900));
        assert_eq!(q("100m"), Ok(100));
        assert_eq!(q("1"), Ok(1000));
        assert_eq!(q("1.5"), Ok(1500));
        assert_eq!(q("2k"), Ok(2_000_000));
        assert_eq!(quantity_milli(&serde_yaml::from_str("90").unwrap()), Ok(90_000));
        assert!(q("-1").is_err());
        assert!(q("10x").is_err());
    }
}
