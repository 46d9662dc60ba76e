//! The ingest protocol between a cell's forwarder and the edge.
//!
//! ```text
//!   POST {edge}/internal/events
//!   X-Cellvm-Cell: aws-use1-01
//!   X-Cellvm-Timestamp: 1718000000123          (unix ms)
//!   X-Cellvm-Signature: v1=<hex HMAC-SHA256(secret,
//!                         timestamp + "." + cell + "." + body)>
//!   {"cellId": "aws-use1-01", "events": [Event, ...]}
//!
//!   200 {"applied": [id..], "duplicate": [id..],
//!        "rejected": [{id, reason}..], "retry": [{id, reason}..]}
//!   400/401 {"error", "code"}: nothing was applied; resend later
//! ```
//!
//! The forwarder acknowledges `applied`, `duplicate` and `rejected`
//! (a rejected event can never apply: resending it would only block
//! the stream) and resends `retry` and any id the answer omits.

use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::event::Event;

/// Path of the ingest route on the edge.
pub const INGEST_PATH: &str = "/internal/events";
/// Header naming the sending cell.
pub const CELL_HEADER: &str = "x-cellvm-cell";
/// Header with the signing time, unix milliseconds.
pub const TIMESTAMP_HEADER: &str = "x-cellvm-timestamp";
/// Header with the signature, `v1=` + hex.
pub const SIGNATURE_HEADER: &str = "x-cellvm-signature";

/// A batch of events from one cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    /// The sending cell; must equal the header and every event's.
    pub cell_id: String,
    /// The events, oldest first.
    pub events: Vec<Event>,
}

/// One event the edge did not take, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// The event id.
    pub id: String,
    /// Why, for the logs.
    pub reason: String,
}

/// The edge's answer to a batch it verified.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngestResponse {
    /// Applied now.
    #[serde(default)]
    pub applied: Vec<String>,
    /// Applied before; nothing done.
    #[serde(default)]
    pub duplicate: Vec<String>,
    /// Never applicable (unknown sandbox, another cell's sandbox...):
    /// acknowledge and drop.
    #[serde(default)]
    pub rejected: Vec<Refused>,
    /// Not applied this time; send again.
    #[serde(default)]
    pub retry: Vec<Refused>,
}

/// Why a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is not `v1=` followed by hex.
    #[error("malformed signature header")]
    Malformed,
    /// The MAC does not match.
    #[error("signature mismatch")]
    Mismatch,
}

/// The signature header value for `body` sent by `cell_id` at
/// `timestamp_ms`: `v1=` + hex HMAC-SHA256 over
/// `"{timestamp_ms}.{cell_id}." + body`. Cell ids hold no `.` (the
/// edge checks them), so the three parts cannot be re-split.
#[must_use]
pub fn sign(
    secret: &[u8],
    timestamp_ms: u64,
    cell_id: &str,
    body: &[u8],
) -> String {
    let mac = mac(secret, timestamp_ms, cell_id, body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks `header` (a [`sign`] output) in constant time.
///
/// # Errors
///
/// [`SignatureError`] when it is malformed or does not match.
pub fn verify(
    secret: &[u8],
    timestamp_ms: u64,
    cell_id: &str,
    body: &[u8],
    header: &str,
) -> Result<(), SignatureError> {
    let hex_sig =
        header.trim().strip_prefix("v1=").ok_or(SignatureError::Malformed)?;
    let sig = hex::decode(hex_sig).map_err(|_| SignatureError::Malformed)?;
    mac(secret, timestamp_ms, cell_id, body)
        .verify_slice(&sig)
        .map_err(|_| SignatureError::Mismatch)
}

fn mac(
    secret: &[u8],
    timestamp_ms: u64,
    cell_id: &str,
    body: &[u8],
) -> Hmac<Sha256> {
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256>>::new_from_slice(secret)
        .expect("HMAC accepts keys of any length");
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(cell_id.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_binds_time_cell_and_body() {
        let s = sign(b"k", 5, "c1", b"{}");
        assert!(s.starts_with("v1="));
        assert_eq!(verify(b"k", 5, "c1", b"{}", &s), Ok(()));
        let bad = |r| assert_eq!(r, Err(SignatureError::Mismatch));
        bad(verify(b"k", 6, "c1", b"{}", &s));
        bad(verify(b"k", 5, "c2", b"{}", &s));
        bad(verify(b"k", 5, "c1", b"{ }", &s));
        bad(verify(b"j", 5, "c1", b"{}", &s));
        assert_eq!(
            verify(b"k", 5, "c1", b"{}", "sha=00"),
            Err(SignatureError::Malformed)
        );
    }
}
