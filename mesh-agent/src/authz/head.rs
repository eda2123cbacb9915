//! What the policy reads from a request's head, and what the application then gets:
//! the method (upper case only), the normalized path and the host. A head the policy
//! cannot read as the application would is refused, never judged as something else.

use super::path::{self, PathError};

/// Why a request head is refused before any policy is asked (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadHead {
    /// Methods are tokens compared case-sensitively: a lower-case verb would be judged
    /// as another method than the one the application may read.
    #[error("method must be upper case")]
    LowerCaseMethod,
    /// The path cannot be normalized.
    #[error("invalid request path: {0}")]
    Path(#[from] PathError),
    /// The normalized path does not make a request target.
    #[error("invalid request target")]
    Target,
}

/// A request head as the policy judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JudgedHead {
    /// The path, normalized ([`path::normalize`]), without the query.
    pub path: String,
    /// `:authority`, else the Host header, lower-cased (empty when neither is there).
    pub host_lowercase: String,
    /// The target forwarded to the application: the normalized path with the original
    /// query, scheme and authority kept.
    pub target: http::Uri,
}

/// Reads a request head for the policy.
pub fn judge(method: &http::Method, uri: &http::Uri, headers: &http::HeaderMap) -> Result<JudgedHead, BadHead> {
    if method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(BadHead::LowerCaseMethod);
    }
    let normalized = path::normalize(uri.path())?;
    let host_lowercase = uri
        .authority()
        .map(http::uri::Authority::as_str)
        .or_else(|| headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or_default()
        .to_ascii_lowercase();
    let target = match uri.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized.clone(),
    };
    let target = path::with_path(uri, &target).map_err(|_| BadHead::Target)?;
    Ok(JudgedHead { path: normalized, host_lowercase, target })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, uri: &str, host: Option<&str>) -> Result<JudgedHead, BadHead> {
        let mut headers = http::HeaderMap::new();
        if let Some(h) = host {
            headers.insert(http::header::HOST, h.parse().unwrap());
        }
        judge(&method.parse().unwrap(), &uri.parse().unwrap(), &headers)
    }

    #[test]
    fn the_policy_and_the_application_read_the_same_head() {
        let j = head("GET", "/api/../admin//x?q=%2F..", Some("MyApp:8080")).unwrap();
        assert_eq!(j.path, "/admin/x");
        assert_eq!(j.host_lowercase, "myapp:8080");
        assert_eq!(j.target.to_string(), "/admin/x?q=%2F..", "the query is kept as sent");
        let j = head("GET", "http://Other.example/%61dmin", Some("myapp")).unwrap();
        assert_eq!(j.host_lowercase, "other.example", "the authority wins over Host");
        assert_eq!(j.target.to_string(), "http://Other.example/admin");
    }

    #[test]
    fn heads_the_policy_cannot_read_are_refused() {
        assert_eq!(head("get", "/", None), Err(BadHead::LowerCaseMethod));
        assert_eq!(head("GET", "/a%2", None), Err(BadHead::Path(PathError::BadEscape)));
        assert_eq!(head("GET", "/a%00", None), Err(BadHead::Path(PathError::Control)));
        assert_eq!(head("OPTIONS", "*", None), Err(BadHead::Path(PathError::NotAbsolute)));
    }
}
