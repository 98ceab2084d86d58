//! Delivery verification. A [`VerifiedDelivery`] can only be made here, by a check that
//! passed: the Healthie signature (reference §4.3), the Hint `X-Hint-Signature`, or the IntakeQ
//! URL token. Handlers turn only verified deliveries into inbox items, so "verified" is a type,
//! not a flag that a code path could forget to set.

use axum::http::HeaderMap;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{HealthieSettings, Secret};
use crate::model::SourceKind;
use crate::sources::healthie::signature::{self, SignatureError};

/// Why a delivery failed verification. Messages name headers, never their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Healthie(#[from] SignatureError),
    #[error("missing or malformed X-Hint-Signature header")]
    MalformedHintSignature,
    #[error("X-Hint-Signature does not match")]
    HintMismatch,
    #[error("no webhook secret configured")]
    NotConfigured,
    #[error("webhook token does not match")]
    WrongToken,
}

impl VerifyError {
    /// A short, PHI-free name for logs.
    pub fn kind(self) -> &'static str {
        match self {
            VerifyError::Healthie(SignatureError::MissingDigest) => "missing_digest",
            VerifyError::Healthie(SignatureError::DigestMismatch) => "digest_mismatch",
            VerifyError::Healthie(SignatureError::MissingSignature) => "missing_signature",
            VerifyError::Healthie(SignatureError::Mismatch) => "signature_mismatch",
            VerifyError::MalformedHintSignature => "missing_signature",
            VerifyError::HintMismatch => "signature_mismatch",
            VerifyError::NotConfigured => "not_configured",
            VerifyError::WrongToken => "wrong_token",
        }
    }
}

/// A request body whose origin has been checked. Only the constructors below make one.
#[derive(Debug)]
pub struct VerifiedDelivery {
    source: SourceKind,
    body: Bytes,
}

impl VerifiedDelivery {
    pub fn source(&self) -> SourceKind {
        self.source
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Checks Healthie's `Content-Digest` and `Signature` headers with
    /// [`signature::verify`] over the public path and the raw query string (without `?`),
    /// against every configured secret.
    pub fn healthie(
        settings: &HealthieSettings,
        raw_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Self, VerifyError> {
        if settings.webhook_secret.is_empty() {
            return Err(VerifyError::NotConfigured);
        }
        let secrets: Vec<&[u8]> = settings
            .webhook_secret
            .iter()
            .map(|s| s.expose().as_bytes())
            .collect();
        signature::verify(
            &secrets,
            &settings.webhook_public_path,
            raw_query,
            &body,
            header(headers, "content-digest"),
            header(headers, "signature"),
        )?;
        Ok(Self {
            source: SourceKind::Healthie,
            body,
        })
    }

    /// Checks `X-Hint-Signature: sha256=<hex>`, the HMAC-SHA256 of the raw body, in constant
    /// time. Upper- or lowercase hex is accepted.
    pub fn hint(secret: &Secret, headers: &HeaderMap, body: Bytes) -> Result<Self, VerifyError> {
        if secret.is_empty() {
            return Err(VerifyError::NotConfigured);
        }
        let given = header(headers, "x-hint-signature")
            .map(str::trim)
            .and_then(|v| {
                let (scheme, hex) = v.split_once('=')?;
                scheme.trim().eq_ignore_ascii_case("sha256").then_some(hex)
            })
            .and_then(|hex| hex::decode(hex.trim()).ok())
            .ok_or(VerifyError::MalformedHintSignature)?;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
            .expect("hmac accepts keys of any length");
        mac.update(&body);
        mac.verify_slice(&given)
            .map_err(|_| VerifyError::HintMismatch)?;
        Ok(Self {
            source: SourceKind::Hint,
            body,
        })
    }

    /// Checks the `{token}` of `/webhooks/intakeq/{token}` against the configured token in
    /// constant time (both are hashed first, so not even the length leaks). IntakeQ signs
    /// nothing; the token in the URL is the only proof of origin.
    pub fn intakeq(expected: &Secret, given: &str, body: Bytes) -> Result<Self, VerifyError> {
        if expected.is_empty() {
            return Err(VerifyError::NotConfigured);
        }
        let want = Sha256::digest(expected.expose().as_bytes());
        let got = Sha256::digest(given.as_bytes());
        if !bool::from(want.as_slice().ct_eq(got.as_slice())) {
            return Err(VerifyError::WrongToken);
        }
        Ok(Self {
            source: SourceKind::Intakeq,
            body,
        })
    }
}

/// A header as text; a missing or non-ASCII value is `None`.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn hint_headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-hint-signature", HeaderValue::from_str(value).unwrap());
        h
    }

    fn hint_sig(secret: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn hint_signature_accepts_lower_and_uppercase_hex() {
        let body = Bytes::from_static(b"{\"id\":\"evt-1\"}");
        let secret = Secret::new("k");
        let sig = hint_sig("k", &body);
        for value in [
            format!("sha256={sig}"),
            format!("SHA256={}", sig.to_uppercase()),
        ] {
            let v = VerifiedDelivery::hint(&secret, &hint_headers(&value), body.clone()).unwrap();
            assert_eq!(v.source(), SourceKind::Hint);
        }
    }

    #[test]
    fn hint_signature_without_prefix_or_with_wrong_key_is_rejected() {
        let body = Bytes::from_static(b"{\"id\":\"evt-1\"}");
        let sig = hint_sig("k", &body);
        let err = VerifiedDelivery::hint(&Secret::new("k"), &hint_headers(&sig), body.clone())
            .unwrap_err();
        assert_eq!(err, VerifyError::MalformedHintSignature);
        let err = VerifiedDelivery::hint(
            &Secret::new("other"),
            &hint_headers(&format!("sha256={sig}")),
            body.clone(),
        )
        .unwrap_err();
        assert_eq!(err, VerifyError::HintMismatch);
        let err = VerifiedDelivery::hint(&Secret::default(), &HeaderMap::new(), body).unwrap_err();
        assert_eq!(err, VerifyError::NotConfigured);
    }

    #[test]
    fn intakeq_token_must_match_exactly() {
        let body = Bytes::new();
        let token = Secret::new("tok-123");
        assert!(VerifiedDelivery::intakeq(&token, "tok-123", body.clone()).is_ok());
        assert_eq!(
            VerifiedDelivery::intakeq(&token, "tok-12", body.clone()).unwrap_err(),
            VerifyError::WrongToken
        );
        assert_eq!(
            VerifiedDelivery::intakeq(&Secret::default(), "", body).unwrap_err(),
            VerifyError::NotConfigured
        );
    }
}
