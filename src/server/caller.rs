//! Who is calling, and until when: a request's `authorization` (gRPC metadata or HTTP
//! header) checked against the tenants, and its gRPC deadline (`grpc-timeout`) as an
//! instant. Both fronts build a [`Caller`] here before anything else is done for the
//! request.
use super::tenants::{Tenant, Tenants};
use crate::error::RequestError;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An authenticated request's caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub tenant: Arc<Tenant>,
    /// When the caller stops waiting (gRPC deadline), if it said.
    pub deadline: Option<Instant>,
}

impl Caller {
    /// The caller of a gRPC request: its `authorization` metadata and `grpc-timeout`.
    pub fn from_grpc(
        tenants: &Tenants,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Self, RequestError> {
        let authorization = metadata.get("authorization").map(|v| v.as_bytes());
        let tenant = tenants.authenticate(authorization)?;
        let deadline = metadata
            .get("grpc-timeout")
            .and_then(|v| parse_grpc_timeout(v.as_bytes()))
            .map(|t| Instant::now() + t);
        Ok(Self { tenant, deadline })
    }

    /// The caller of an HTTP request (no deadline).
    pub fn from_http(
        tenants: &Tenants,
        headers: &axum::http::HeaderMap,
    ) -> Result<Self, RequestError> {
        let authorization = headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        Ok(Self {
            tenant: tenants.authenticate(authorization)?,
            deadline: None,
        })
    }
}

/// A `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n); None if
/// malformed (the request then has no deadline, as gRPC's spec lets servers do).
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_in_every_unit_and_malformed_ones_ignored() {
        let ok = [
            ("200m", Duration::from_millis(200)),
            ("1S", Duration::from_secs(1)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3600)),
            ("99999999u", Duration::from_micros(99_999_999)),
            ("5n", Duration::from_nanos(5)),
        ];
        for (v, d) in ok {
            assert_eq!(parse_grpc_timeout(v.as_bytes()), Some(d), "{v}");
        }
        for bad in ["", "m", "123456789m", "12x", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad.as_bytes()), None, "{bad}");
        }
    }
}
