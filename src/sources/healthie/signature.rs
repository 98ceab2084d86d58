//! Healthie's webhook signature (reference §4.3): HMAC-SHA256, lowercase hex, over
//! `post {public path} {query} {content digest after the first '='} application/json {byte length}`,
//! where the `Content-Digest` header is `sha-256=<base64 of sha256(body)>`.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Why a delivery failed verification. Deliberately coarse: the caller answers 401 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing Content-Digest header")]
    MissingDigest,
    #[error("Content-Digest does not match the body")]
    DigestMismatch,
    #[error("missing or malformed Signature header")]
    MissingSignature,
    #[error("signature does not match")]
    Mismatch,
}

/// The `Content-Digest` header value for a body: `sha-256=<base64>`.
pub fn content_digest(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    format!(
        "sha-256={}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The string Healthie signs.
pub fn signing_string(
    path: &str,
    query: &str,
    digest_value: &str,
    content_length: usize,
) -> String {
    format!("post {path} {query} {digest_value} application/json {content_length}")
}

fn hmac_hex(secret: &[u8], message: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("hmac accepts keys of any length");
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Headers a Healthie delivery carries: `(Content-Digest, Signature)`.
pub fn sign(secret: &[u8], path: &str, query: &str, body: &[u8]) -> (String, String) {
    let digest_header = content_digest(body);
    let digest_value = value_after_first_eq(&digest_header);
    let signature = hmac_hex(
        secret,
        &signing_string(path, query, digest_value, body.len()),
    );
    (digest_header, format!("sig1={signature}"))
}

fn value_after_first_eq(header: &str) -> &str {
    header.split_once('=').map(|(_, v)| v).unwrap_or(header)
}

/// Checks a delivery against every accepted secret (several during rotation).
///
/// The digest is checked against the body (base64, or hex defensively), then the HMAC is
/// compared in constant time, first over the whole digest value after the first `=` and then,
/// as Healthie's own sample computes it, with base64 padding stripped.
pub fn verify(
    secrets: &[&[u8]],
    path: &str,
    query: &str,
    body: &[u8],
    content_digest_header: Option<&str>,
    signature_header: Option<&str>,
) -> Result<(), SignatureError> {
    let digest_header = content_digest_header
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .ok_or(SignatureError::MissingDigest)?;
    let digest_value = value_after_first_eq(digest_header);
    let actual = Sha256::digest(body);
    let b64 = base64::engine::general_purpose::STANDARD.encode(actual);
    let hex_digest = hex::encode(actual);
    let digest_ok = bool::from(digest_value.as_bytes().ct_eq(b64.as_bytes()))
        || bool::from(
            digest_value
                .trim_end_matches('=')
                .as_bytes()
                .ct_eq(b64.trim_end_matches('=').as_bytes()),
        )
        || bool::from(
            digest_value
                .to_ascii_lowercase()
                .as_bytes()
                .ct_eq(hex_digest.as_bytes()),
        );
    if !digest_ok {
        return Err(SignatureError::DigestMismatch);
    }
    let given = signature_header
        .map(str::trim)
        .map(|s| value_after_first_eq(s).trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .ok_or(SignatureError::MissingSignature)?;
    let stripped = digest_value.trim_end_matches('=');
    for secret in secrets {
        for candidate in [digest_value, stripped] {
            let expected = hmac_hex(secret, &signing_string(path, query, candidate, body.len()));
            if bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
                return Ok(());
            }
        }
    }
    Err(SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"resource_id":"45678","resource_id_type":"User","event_type":"patient.updated","changed_fields":["first_name"]}"#;

    #[test]
    fn signed_delivery_verifies() {
        let (digest, sig) = sign(b"whsec_a", "/webhooks/healthie", "", BODY);
        assert!(verify(
            &[b"whsec_a"],
            "/webhooks/healthie",
            "",
            BODY,
            Some(&digest),
            Some(&sig)
        )
        .is_ok());
    }

    #[test]
    fn signing_string_keeps_two_spaces_for_an_empty_query() {
        assert_eq!(
            signing_string("/h", "", "abc=", 12),
            "post /h  abc= application/json 12"
        );
    }

    #[test]
    fn any_of_several_secrets_is_accepted() {
        let (digest, sig) = sign(b"new", "/webhooks/healthie", "", BODY);
        assert!(verify(
            &[b"old", b"new"],
            "/webhooks/healthie",
            "",
            BODY,
            Some(&digest),
            Some(&sig)
        )
        .is_ok());
        assert_eq!(
            verify(
                &[b"old"],
                "/webhooks/healthie",
                "",
                BODY,
                Some(&digest),
                Some(&sig)
            ),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn a_one_byte_change_anywhere_is_rejected() {
        let (digest, sig) = sign(b"s", "/webhooks/healthie", "", BODY);
        let mut body = BODY.to_vec();
        body[10] ^= 1;
        assert_eq!(
            verify(
                &[b"s"],
                "/webhooks/healthie",
                "",
                &body,
                Some(&digest),
                Some(&sig)
            ),
            Err(SignatureError::DigestMismatch)
        );
        assert_eq!(
            verify(
                &[b"s"],
                "/webhooks/healthiE",
                "",
                BODY,
                Some(&digest),
                Some(&sig)
            ),
            Err(SignatureError::Mismatch)
        );
        let mut bad_digest = digest.clone().into_bytes();
        bad_digest[9] ^= 1;
        let bad_digest = String::from_utf8(bad_digest).unwrap();
        assert!(verify(
            &[b"s"],
            "/webhooks/healthie",
            "",
            BODY,
            Some(&bad_digest),
            Some(&sig)
        )
        .is_err());
    }

    #[test]
    fn padding_stripped_signatures_from_the_official_sample_verify() {
        let digest_header = content_digest(BODY);
        assert!(
            digest_header.ends_with('='),
            "sha256 base64 always pads one '='"
        );
        let stripped = digest_header.split('=').nth(1).unwrap();
        let sig = hmac_hex(b"s", &signing_string("/w", "", stripped, BODY.len()));
        assert!(verify(
            &[b"s"],
            "/w",
            "",
            BODY,
            Some(&digest_header),
            Some(&format!("sig1={sig}"))
        )
        .is_ok());
    }

    #[test]
    fn content_length_is_the_byte_length() {
        let body = "{\"resource_id\":\"1\",\"note\":\"Zoë\"}".as_bytes();
        let (digest, sig) = sign(b"s", "/w", "", body);
        let chars = std::str::from_utf8(body).unwrap().chars().count();
        assert_ne!(chars, body.len());
        assert!(verify(&[b"s"], "/w", "", body, Some(&digest), Some(&sig)).is_ok());
    }

    #[test]
    fn missing_headers_are_rejected() {
        assert_eq!(
            verify(&[b"s"], "/w", "", BODY, None, Some("sig1=00")),
            Err(SignatureError::MissingDigest)
        );
        let digest = content_digest(BODY);
        assert_eq!(
            verify(&[b"s"], "/w", "", BODY, Some(&digest), None),
            Err(SignatureError::MissingSignature)
        );
    }
}
