//! Request path normalization before authorization, so that `/api/../admin`,
//! `/admin//x`, `\admin`, `/%61dmin` and `/admin%2Fx` are judged as the application will
//! read them. The normalized path is also what the application receives, so the policy
//! and the application never disagree about which path a request named.
//!
//! Istio's `BASE` normalization (RFC 3986 dot segments, backslashes as slashes) plus
//! its `DECODE_AND_MERGE_SLASHES` option (`%2F`/`%5C` decoded, `//` merged), which its
//! security best practices recommend for DENY policies on paths.

/// A path that cannot be normalized: the request is refused with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not in origin form (`/...`).
    #[error("path must start with '/'")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("malformed percent-encoding")]
    BadEscape,
    /// A decoded byte that is not allowed in a path (NUL, control characters).
    #[error("control character in path")]
    Control,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// `uri` with its path and query replaced (by what was judged); scheme and authority
/// kept (HTTP/2).
pub fn with_path(uri: &http::Uri, path_and_query: &str) -> Result<http::Uri, http::Error> {
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse()?);
    Ok(http::Uri::from_parts(parts)?)
}

/// Normalizes the path part of a request target (no query).
pub fn normalize(path: &str) -> Result<String, PathError> {
    let raw = path.as_bytes();
    if raw.first() != Some(&b'/') && raw.first() != Some(&b'\\') {
        return Err(PathError::NotAbsolute);
    }
    // 1. Percent-decoding of unreserved characters and of encoded slashes; other
    //    escapes are kept, with upper-case hex digits (RFC 3986 6.2.2.1).
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (raw.get(i + 1).copied().and_then(hex), raw.get(i + 2).copied().and_then(hex))
            else {
                return Err(PathError::BadEscape);
            };
            let v = h * 16 + l;
            if v < 0x20 || v == 0x7f {
                return Err(PathError::Control);
            }
            if unreserved(v) || v == b'/' || v == b'\\' {
                decoded.push(v);
            } else {
                decoded.extend_from_slice(format!("%{v:02X}").as_bytes());
            }
            i += 3;
            continue;
        }
        if b < 0x20 || b == 0x7f {
            return Err(PathError::Control);
        }
        decoded.push(b);
        i += 1;
    }
    // 2. Backslashes are slashes; 3. runs of slashes are one; 4. dot segments resolved.
    let text = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    let trailing_slash = text.ends_with('/') || text.ends_with("/.") || text.ends_with("/..");
    for seg in text.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(text.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (trailing_slash && !segments.is_empty()) {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{PathError, normalize};

    #[test]
    fn dot_segments_slashes_and_escapes_are_resolved() {
        let cases = [
            ("/", "/"),
            ("/api/users", "/api/users"),
            ("/api/users/", "/api/users/"),
            ("/api/../admin", "/admin"),
            ("/api/./x", "/api/x"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("//api///x", "/api/x"),
            ("\\admin\\x", "/admin/x"),
            ("/%61dmin", "/admin"),
            ("/admin%2Fsecret", "/admin/secret"),
            ("/admin%5csecret", "/admin/secret"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/%7e", "/a/~"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn malformed_paths_are_refused() {
        assert_eq!(normalize("api"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("*"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%00b"), Err(PathError::Control));
    }
}
