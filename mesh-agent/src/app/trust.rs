//! Following the CA's trust bundle: a long poll the CA holds until the bundle changes,
//! so an idle agent (or gateway) wakes once per [`crate::identity::WATCH_WAIT`] rather
//! than once per `--trust-refresh`, and a root rotation reaches it at once. Against a CA that answers
//! at once, the ask repeats every `--trust-refresh`.
//!
//! Invariant: a failed ask keeps the roots held (the mesh keeps verifying peers against
//! them); only an answer from the CA, checked against those roots, replaces them.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::code_pages::OneOffWork;
use crate::identity::{Asked, CertStore, Pace, PeerVerifier};

/// Follows the trust bundle for `certs` and `verifier` until `stop`; `changed` runs
/// when the roots or the signing certificate changed. An answer that comes seldom (news,
/// or held by the CA) is one-off work: the code that asked for it is dropped again once
/// quiet.
pub(crate) fn follow(
    certs: Arc<CertStore>,
    verifier: PeerVerifier,
    every: Duration,
    one_off: OneOffWork,
    changed: impl Fn() + Send + 'static,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut pace = Pace::new(every);
        loop {
            let asked = match certs.refresh_trust_after(&verifier, pace.watch()).await {
                // A signer in the process: nothing to follow.
                Ok((_, None)) => return,
                Ok((news, Some(version))) => {
                    let asked = pace.answered(version);
                    if news {
                        changed();
                    }
                    if pace.seldom(asked) {
                        one_off.done();
                    }
                    asked
                }
                Err(e) => {
                    tracing::warn!(error = %e, "trust bundle refresh failed; keeping the current roots");
                    Asked::Failed
                }
            };
            if !pace.next(asked, &stop).await {
                return;
            }
        }
    });
}
