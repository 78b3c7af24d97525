//! Stripe's webhook requests: the `Stripe-Signature` check and the events Reservoir
//! acts on.
//!
//! The header is `t=<unix seconds>,v1=<hex HMAC-SHA256>[,v1=…][,v0=…]`; the signed
//! message is `"<t>.<raw body>"` and the key is the endpoint's signing secret
//! (`whsec_…`). A request is accepted when one `v1` matches (compared in constant time)
//! and `t` is within [`SIGNATURE_TOLERANCE_SECS`] of now (older is a replay, newer a
//! clock far off). Stripe rolls secrets by signing with several: any `v1` may match.
//!
//! | event type | effect |
//! |---|---|
//! | `payment_intent.succeeded` | `Charge { outcome: Succeeded }` |
//! | `payment_intent.payment_failed` | `Charge { outcome: RequiresAction }` for `authentication_required`, else `Declined` with the last error's decline code or code |
//! | `charge.dispute.created` | `Dispute` on the dispute's PaymentIntent (the purchase's charge id), with its reason |
//! | anything else | `Ignored` |

use billing::payments::{ChargeOutcome, EventEffect, GatewayEvent, WebhookError};
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2_011::Sha256;

/// How far a signature's timestamp may be from now (Stripe's libraries use 5 minutes).
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;
/// The decline reason Stripe gives when a card needs 3-D Secure off-session.
pub(crate) const AUTHENTICATION_REQUIRED: &str = "authentication_required";
/// Most `v1` signatures read from one header (Stripe sends one or two).
const SIGNATURES_MAX: usize = 8;

/// Verifies `header` over `payload` with `secret` at `now`, then reads the event.
pub fn verify(
    secret: &str,
    payload: &[u8],
    header: Option<&str>,
    now: DateTime<Utc>,
) -> Result<GatewayEvent, WebhookError> {
    let header = header.ok_or(WebhookError::BadSignature("no Stripe-Signature header"))?;
    let (timestamp, signatures) = parse_header(header)?;
    if (now.timestamp() - timestamp).abs() > SIGNATURE_TOLERANCE_SECS {
        return Err(WebhookError::BadSignature(
            "timestamp outside the tolerance",
        ));
    }
    let matches = signatures.iter().any(|signature| {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
            return false;
        };
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(payload);
        // `verify_slice` compares in constant time.
        mac.verify_slice(signature).is_ok()
    });
    if !matches {
        return Err(WebhookError::BadSignature("no signature matches"));
    }
    read_event(payload)
}

/// `(t, [v1 signatures])` of a `Stripe-Signature` header.
fn parse_header(header: &str) -> Result<(i64, Vec<Vec<u8>>), WebhookError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => {
                timestamp = Some(
                    t.parse::<i64>()
                        .map_err(|_| WebhookError::BadSignature("unreadable timestamp"))?,
                );
            }
            Some(("v1", v1)) if signatures.len() < SIGNATURES_MAX => {
                if let Ok(bytes) = hex::decode(v1) {
                    signatures.push(bytes);
                }
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(WebhookError::BadSignature("no timestamp"))?;
    if signatures.is_empty() {
        return Err(WebhookError::BadSignature("no v1 signature"));
    }
    Ok((timestamp, signatures))
}

#[derive(Deserialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: EventData,
}

#[derive(Deserialize)]
struct EventData {
    object: serde_json::Value,
}

#[derive(Deserialize)]
struct IntentObject {
    id: String,
    #[serde(default)]
    metadata: std::collections::HashMap<String, serde_json::Value>,
    #[serde(default)]
    last_payment_error: Option<LastError>,
}

#[derive(Deserialize)]
struct LastError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    decline_code: Option<String>,
}

#[derive(Deserialize)]
struct DisputeObject {
    #[serde(default)]
    charge: Option<String>,
    #[serde(default)]
    payment_intent: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

fn malformed(e: impl std::fmt::Display) -> WebhookError {
    WebhookError::Malformed(e.to_string())
}

/// A verified body → the event as the domain sees it.
fn read_event(payload: &[u8]) -> Result<GatewayEvent, WebhookError> {
    let event: Event = serde_json::from_slice(payload).map_err(malformed)?;
    let effect = match event.kind.as_str() {
        "payment_intent.succeeded" | "payment_intent.payment_failed" => {
            let intent: IntentObject =
                serde_json::from_value(event.data.object).map_err(malformed)?;
            let outcome = if event.kind == "payment_intent.succeeded" {
                ChargeOutcome::Succeeded {
                    charge_id: intent.id.clone(),
                }
            } else {
                failed_outcome(&intent)
            };
            EventEffect::Charge {
                idempotency_key: intent
                    .metadata
                    .get(crate::stripe::IDEMPOTENCY_KEY_METADATA)
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned),
                charge_id: intent.id,
                outcome,
            }
        }
        "charge.dispute.created" => {
            let dispute: DisputeObject =
                serde_json::from_value(event.data.object).map_err(malformed)?;
            // A purchase stores its PaymentIntent's id as its charge id.
            let charge_id = dispute
                .payment_intent
                .or(dispute.charge)
                .ok_or_else(|| malformed("a dispute without a payment"))?;
            EventEffect::Dispute {
                charge_id,
                reason: dispute.reason.unwrap_or_else(|| "unknown".to_owned()),
            }
        }
        _ => EventEffect::Ignored,
    };
    Ok(GatewayEvent {
        id: event.id,
        kind: event.kind,
        effect,
    })
}

/// A `payment_intent.payment_failed` → a decline, or REQUIRES_ACTION when the bank
/// asked for 3-D Secure.
fn failed_outcome(intent: &IntentObject) -> ChargeOutcome {
    let error = intent.last_payment_error.as_ref();
    let code = error.and_then(|e| e.code.as_deref()).unwrap_or("");
    let decline = error.and_then(|e| e.decline_code.as_deref()).unwrap_or("");
    if code == AUTHENTICATION_REQUIRED || decline == AUTHENTICATION_REQUIRED {
        return ChargeOutcome::RequiresAction {
            charge_id: Some(intent.id.clone()),
            reason: AUTHENTICATION_REQUIRED.to_owned(),
        };
    }
    let reason = [decline, code]
        .into_iter()
        .find(|r| !r.is_empty())
        .unwrap_or("payment_failed");
    ChargeOutcome::Declined {
        reason: reason.to_owned(),
    }
}

/// The `Stripe-Signature` header Stripe would send for `payload` at `timestamp`
/// (tests, and tools that replay events to a local endpoint).
pub fn sign(secret: &str, payload: &[u8], timestamp: i64) -> String {
    let signature = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_or_else(
        |_| String::new(),
        |mut mac| {
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(payload);
            hex::encode(mac.finalize().into_bytes())
        },
    );
    format!("t={timestamp},v1={signature}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";

    fn body(kind: &str, object: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "id": "evt_1", "object": "event", "type": kind, "data": {"object": object}
        }))
        .expect("json")
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231, test case 2.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").expect("key");
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_signed_event_is_read_and_anything_else_refused() {
        let now = Utc::now();
        let payload = body(
            "payment_intent.succeeded",
            serde_json::json!({"id": "pi_1", "metadata": {"reservoir_idempotency_key": "k"}}),
        );
        let header = sign(SECRET, &payload, now.timestamp());
        let event = verify(SECRET, &payload, Some(&header), now).expect("verified");
        assert_eq!(
            event.effect,
            EventEffect::Charge {
                idempotency_key: Some("k".into()),
                charge_id: "pi_1".into(),
                outcome: ChargeOutcome::Succeeded {
                    charge_id: "pi_1".into()
                },
            }
        );
        let bad = |p: &[u8], h: Option<&str>| verify(SECRET, p, h, now).is_err();
        assert!(bad(&payload, None));
        assert!(bad(&payload, Some("t=1,v1=00")));
        assert!(bad(b"{}", Some(&header)), "another body");
        let other = sign("whsec_other", &payload, now.timestamp());
        assert!(bad(&payload, Some(&other)), "another secret");
        let old = sign(
            SECRET,
            &payload,
            now.timestamp() - SIGNATURE_TOLERANCE_SECS - 1,
        );
        assert!(bad(&payload, Some(&old)), "too old");
        // A rolled secret: one of several v1 signatures matches.
        let rolled = format!(
            "{other},v1={}",
            &header[header.find("v1=").map_or(0, |i| i + 3)..]
        );
        assert!(
            verify(SECRET, &payload, Some(&rolled), now).is_ok(),
            "{rolled}"
        );
    }

    #[test]
    fn failures_and_disputes() {
        let needs_action = body(
            "payment_intent.payment_failed",
            serde_json::json!({"id": "pi_2", "last_payment_error": {"code": "authentication_required"}}),
        );
        let declined = body(
            "payment_intent.payment_failed",
            serde_json::json!({"id": "pi_3", "last_payment_error": {"code": "card_declined", "decline_code": "insufficient_funds"}}),
        );
        let dispute = body(
            "charge.dispute.created",
            serde_json::json!({"id": "dp_1", "charge": "ch_1", "payment_intent": "pi_4", "reason": "fraudulent"}),
        );
        let outcome = |p: &[u8]| match read_event(p).map(|e| e.effect) {
            Ok(EventEffect::Charge { outcome, .. }) => Some(outcome),
            _ => None,
        };
        assert!(matches!(
            outcome(&needs_action),
            Some(ChargeOutcome::RequiresAction { .. })
        ));
        assert_eq!(
            outcome(&declined),
            Some(ChargeOutcome::Declined {
                reason: "insufficient_funds".into()
            })
        );
        assert_eq!(
            read_event(&dispute).map(|e| e.effect),
            Ok(EventEffect::Dispute {
                charge_id: "pi_4".into(),
                reason: "fraudulent".into()
            })
        );
        let other = body("customer.created", serde_json::json!({"id": "cus_1"}));
        assert_eq!(
            read_event(&other).map(|e| e.effect),
            Ok(EventEffect::Ignored)
        );
    }
}
