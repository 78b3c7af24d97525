//! The `Reservoir-Signature` header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>" keyed with the endpoint's secret>`. The timestamp is inside the
//! signed text so a receiver can refuse a replayed old request.

use hmac::{Hmac, KeyInit, Mac};
use rand::Rng as _;
use sha2_011::Sha256;

/// The header's name.
pub const SIGNATURE_HEADER: &str = "Reservoir-Signature";
/// What a secret starts with, so a leaked one is recognisable.
pub const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a secret (hex-encoded after the prefix).
const SECRET_BYTES: usize = 32;
/// The timestamp tolerance we tell receivers to apply (docs/WEBHOOKS.md).
pub const RECEIVER_TOLERANCE_SECS: i64 = 300;

/// A new signing secret: `whsec_` and 64 hex digits.
pub fn new_secret() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rng().fill(&mut bytes[..]);
    format!("{SECRET_PREFIX}{}", hex::encode(bytes))
}

/// The hex HMAC-SHA256 of `"<timestamp>.<body>"` under `secret`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts a key of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The header's value for one attempt.
pub fn header_value(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", signature(secret, timestamp, body))
}

/// Checks a header as a receiver would (tests and tools): the signature matches and
/// the timestamp is within `tolerance_secs` of `now_secs`.
pub fn verify(secret: &str, header: &str, body: &[u8], now_secs: i64, tolerance_secs: i64) -> bool {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.push(v),
            _ => {}
        }
    }
    let Some(t) = timestamp else { return false };
    if (now_secs - t).abs() > tolerance_secs {
        return false;
    }
    let expected = signature(secret, t, body);
    signatures.iter().any(|s| {
        use subtle::ConstantTimeEq as _;
        s.len() == expected.len() && bool::from(s.as_bytes().ct_eq(expected.as_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies() {
        let secret = new_secret();
        assert!(secret.starts_with(SECRET_PREFIX) && secret.len() == 6 + 64);
        let header = header_value(&secret, 1_700_000_000, b"{\"a\":1}");
        assert!(verify(&secret, &header, b"{\"a\":1}", 1_700_000_010, 300));
        assert!(!verify(&secret, &header, b"{\"a\":2}", 1_700_000_010, 300));
        assert!(!verify(
            "whsec_other",
            &header,
            b"{\"a\":1}",
            1_700_000_010,
            300
        ));
        assert!(!verify(&secret, &header, b"{\"a\":1}", 1_700_000_400, 300));
    }

    #[test]
    fn matches_a_known_vector() {
        // Computed independently: python3 -c "import hmac, hashlib;
        // print(hmac.new(b'key', b'1.body', hashlib.sha256).hexdigest())"
        assert_eq!(
            signature("key", 1, b"body"),
            "91b5374b153842ad05b2c4eab9349b8321b14703165bd3fb8b034dfb8be98ae5"
        );
    }
}
