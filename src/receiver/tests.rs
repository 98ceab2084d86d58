//! Router tests: every request goes through `router()` with `oneshot`, against a SQLite store
//! in a temporary directory. No sleeps, no network.

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tempfile::TempDir;
use tower::ServiceExt;

use super::{router, ReceiverState};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::model::{InboxId, SourceKind};
use crate::sources::healthie::signature;
use crate::store::{InboxItem, InboxState, Store};

/// The public path Healthie signs; deliberately not the path the router sees (reverse proxy).
const PUBLIC_PATH: &str = "/ops/healthie/webhook/";
const HEALTHIE_SECRET: &str = "whsec_new";
const HEALTHIE_OLD_SECRET: &str = "whsec_old";
const HINT_SECRET: &str = "hint-signing-key";
const INTAKEQ_TOKEN: &str = "iq-token-5f1c0a7e";
const BODY_LIMIT: usize = 4096;

const PATIENT_UPDATED: &str = r#"{"resource_id":"45678","resource_id_type":"User","event_type":"patient.updated","changed_fields":["first_name","email"]}"#;

struct TestApp {
    router: Router,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    _dir: TempDir,
}

fn settings(overrides: &[(&str, &str)]) -> Settings {
    let limit = BODY_LIMIT.to_string();
    let secrets = format!("{HEALTHIE_SECRET},{HEALTHIE_OLD_SECRET}");
    let env: Vec<(String, String)> = [
        ("PATIENT_SYNC_SERVER__BODY_LIMIT_BYTES", limit.as_str()),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__WEBHOOK_PUBLIC_PATH",
            PUBLIC_PATH,
        ),
        ("PATIENT_SYNC_SOURCES__HEALTHIE__WEBHOOK_SECRET", &secrets),
        ("PATIENT_SYNC_SOURCES__HINT__ENABLED", "true"),
        ("PATIENT_SYNC_SOURCES__HINT__WEBHOOK_SECRET", HINT_SECRET),
        ("PATIENT_SYNC_SOURCES__INTAKEQ__ENABLED", "true"),
        (
            "PATIENT_SYNC_SOURCES__INTAKEQ__WEBHOOK_TOKEN",
            INTAKEQ_TOKEN,
        ),
    ]
    .iter()
    .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
    .chain(overrides)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Settings::load_from(None, &env).unwrap()
}

async fn app_with(overrides: &[(&str, &str)], migrate: bool) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("inbox.sqlite").display());
    let store = crate::store::connect(&url, 4).await.unwrap();
    if migrate {
        store.migrate().await.unwrap();
    }
    let metrics = Arc::new(Metrics::new());
    let state = ReceiverState::new(
        store.clone(),
        Arc::new(settings(overrides)),
        metrics.clone(),
    );
    TestApp {
        router: router(state),
        store,
        metrics,
        _dir: dir,
    }
}

async fn app() -> TestApp {
    app_with(&[], true).await
}

struct Reply {
    status: StatusCode,
    content_type: String,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|_| panic!("not JSON: {}", self.text))
    }

    fn inbox_id(&self) -> InboxId {
        InboxId(self.json()["inbox_id"].as_i64().expect("inbox_id"))
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().expect("error").to_string()
    }
}

impl TestApp {
    async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        Reply {
            status,
            content_type,
            text: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }

    async fn get(&self, uri: &str) -> Reply {
        self.send(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    /// Inbox rows, all sources and states.
    async fn inbox_total(&self) -> i64 {
        self.store
            .inbox_counts()
            .await
            .unwrap()
            .iter()
            .map(|c| c.count)
            .sum()
    }

    async fn item(&self, id: InboxId) -> InboxItem {
        self.store.load_inbox_item(id).await.unwrap().expect("item")
    }
}

/// A Healthie delivery signed with `secret` over the public path and `query`.
fn healthie(body: &[u8], secret: &str, query: &str) -> Request<Body> {
    let (digest, sig) = signature::sign(secret.as_bytes(), PUBLIC_PATH, query, body);
    let uri = if query.is_empty() {
        "/webhooks/healthie".to_string()
    } else {
        format!("/webhooks/healthie?{query}")
    };
    Request::post(uri)
        .header("content-type", "application/json")
        .header("content-digest", digest)
        .header("signature-input", "sig1=(\"@method\" \"@path\" \"@query\" \"content-digest\" \"content-type\" \"content-length\")")
        .header("signature", sig)
        .body(Body::from(body.to_vec()))
        .unwrap()
}

fn signed(body: &str) -> Request<Body> {
    healthie(body.as_bytes(), HEALTHIE_SECRET, "")
}

fn hint_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn hint(body: &str, signature: &str) -> Request<Body> {
    Request::post("/webhooks/hint")
        .header("content-type", "application/json")
        .header("x-hint-signature", signature)
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn intakeq(token: &str, body: &str) -> Request<Body> {
    Request::post(format!("/webhooks/intakeq/{token}"))
        .header("content-type", "application/json; charset=utf-8")
        .body(Body::from(body.to_string()))
        .unwrap()
}

// ---- Healthie ----

#[tokio::test]
async fn signed_healthie_delivery_is_stored_as_pending_for_its_user() {
    let app = app().await;
    let reply = app.send(signed(PATIENT_UPDATED)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    assert_eq!(reply.json()["status"], "accepted");
    let item = app.item(reply.inbox_id()).await;
    assert_eq!(item.source, SourceKind::Healthie);
    assert_eq!(item.origin, "webhook");
    assert_eq!(item.event_type, "patient.updated");
    assert_eq!(item.resource_type.as_deref(), Some("User"));
    assert_eq!(item.resource_id.as_deref(), Some("45678"));
    assert_eq!(item.body, PATIENT_UPDATED);
    assert_eq!(item.state, InboxState::Pending);
}

#[tokio::test]
async fn healthie_resource_id_may_be_a_number() {
    let app = app().await;
    let reply = app
        .send(signed(
            r#"{"resource_id":45678,"resource_id_type":"User","event_type":"patient.created","changed_fields":[]}"#,
        ))
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    let item = app.item(reply.inbox_id()).await;
    assert_eq!(item.resource_id.as_deref(), Some("45678"));
}

#[tokio::test]
async fn healthie_changed_fields_may_be_a_string() {
    let app = app().await;
    let reply = app
        .send(signed(
            r#"{"resource_id":"1","resource_id_type":"User","event_type":"patient.updated","changed_fields":"first_name"}"#,
        ))
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    assert_eq!(app.inbox_total().await, 1);
}

#[tokio::test]
async fn the_raw_query_string_is_part_of_the_signature() {
    let app = app().await;
    let reply = app
        .send(healthie(
            PATIENT_UPDATED.as_bytes(),
            HEALTHIE_SECRET,
            "org=7&x=%20y",
        ))
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    // Signed with a query but delivered without one.
    let (digest, sig) = signature::sign(
        HEALTHIE_SECRET.as_bytes(),
        PUBLIC_PATH,
        "org=7",
        PATIENT_UPDATED.as_bytes(),
    );
    let request = Request::post("/webhooks/healthie")
        .header("content-type", "application/json")
        .header("content-digest", digest)
        .header("signature", sig)
        .body(Body::from(PATIENT_UPDATED))
        .unwrap();
    assert_eq!(app.send(request).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.inbox_total().await, 1);
}

#[tokio::test]
async fn a_one_byte_change_to_body_digest_or_path_is_unauthorized_and_stores_nothing() {
    let app = app().await;
    let body = PATIENT_UPDATED.as_bytes();
    let (digest, sig) = signature::sign(HEALTHIE_SECRET.as_bytes(), PUBLIC_PATH, "", body);

    let mut changed_body = body.to_vec();
    changed_body[17] ^= 1;
    let mut changed_digest = digest.clone().into_bytes();
    changed_digest[12] ^= 1;
    let changed_digest = String::from_utf8(changed_digest).unwrap();
    // Signed over the router's path, not the public one.
    let (wrong_path_digest, wrong_path_sig) =
        signature::sign(HEALTHIE_SECRET.as_bytes(), "/webhooks/healthie", "", body);

    // (what changed, body, Content-Digest, Signature)
    type Case<'a> = (&'a str, Vec<u8>, Option<String>, Option<String>);
    let cases: Vec<Case> = vec![
        (
            "body",
            changed_body,
            Some(digest.clone()),
            Some(sig.clone()),
        ),
        (
            "digest",
            body.to_vec(),
            Some(changed_digest),
            Some(sig.clone()),
        ),
        (
            "path",
            body.to_vec(),
            Some(wrong_path_digest),
            Some(wrong_path_sig),
        ),
        ("no signature", body.to_vec(), Some(digest.clone()), None),
        ("no digest", body.to_vec(), None, Some(sig.clone())),
        (
            "other secret",
            body.to_vec(),
            Some(digest.clone()),
            Some(signature::sign(b"whsec_other", PUBLIC_PATH, "", body).1),
        ),
    ];
    for (what, body, digest, sig) in cases {
        let mut request =
            Request::post("/webhooks/healthie").header("content-type", "application/json");
        if let Some(d) = digest {
            request = request.header("content-digest", d);
        }
        if let Some(s) = sig {
            request = request.header("signature", s);
        }
        let reply = app.send(request.body(Body::from(body)).unwrap()).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(reply.error(), "invalid signature", "{what}");
    }
    assert_eq!(app.inbox_total().await, 0);
    assert_eq!(
        app.metrics.counter(
            super::WEBHOOKS_RECEIVED,
            &[("source", "healthie"), ("outcome", "unauthorized")]
        ),
        6
    );
}

#[tokio::test]
async fn either_secret_works_during_rotation() {
    let app = app().await;
    for secret in [HEALTHIE_SECRET, HEALTHIE_OLD_SECRET] {
        let reply = app
            .send(healthie(PATIENT_UPDATED.as_bytes(), secret, ""))
            .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{secret}");
    }
    assert_eq!(app.inbox_total().await, 2);
}

#[tokio::test]
async fn without_a_configured_secret_every_healthie_delivery_is_unauthorized() {
    let app = app_with(
        &[("PATIENT_SYNC_SOURCES__HEALTHIE__WEBHOOK_SECRET", "")],
        true,
    )
    .await;
    let reply = app.send(signed(PATIENT_UPDATED)).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.inbox_total().await, 0);
}

#[tokio::test]
async fn healthie_test_event_is_stored_as_ignored() {
    let app = app().await;
    let reply = app
        .send(signed(
            r#"{"resource_id":"1","resource_id_type":"Webhook","event_type":"test.created","changed_fields":[]}"#,
        ))
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.json()["status"], "ignored");
    let item = app.item(reply.inbox_id()).await;
    assert_eq!(item.state, InboxState::Ignored);
    assert_eq!(item.reason.as_deref(), Some("test event"));
}

#[tokio::test]
async fn unknown_healthie_event_is_stored_as_ignored_with_a_reason() {
    let app = app().await;
    let reply = app
        .send(signed(
            r#"{"resource_id":"991","resource_id_type":"Appointment","event_type":"appointment.created","resource_organization_id":12}"#,
        ))
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let item = app.item(reply.inbox_id()).await;
    assert_eq!(item.state, InboxState::Ignored);
    assert_eq!(
        item.reason.as_deref(),
        Some("event type appointment.created not handled")
    );
    assert_eq!(
        app.metrics.counter(
            super::WEBHOOKS_RECEIVED,
            &[("source", "healthie"), ("outcome", "ignored")]
        ),
        1
    );
}

#[tokio::test]
async fn healthie_location_event_routes_to_its_user_id() {
    let app = app().await;
    let reply = app
        .send(signed(
            r#"{"resource_id":"555","resource_id_type":"Location","event_type":"location.updated","changed_fields":["line1"],"user_id":"45678"}"#,
        ))
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let item = app.item(reply.inbox_id()).await;
    assert_eq!(item.state, InboxState::Pending);
    assert_eq!(item.resource_type.as_deref(), Some("Location"));
    assert_eq!(item.resource_id.as_deref(), Some("45678"));
}

#[tokio::test]
async fn healthie_merge_routes_to_the_destination_and_keeps_the_whole_body() {
    let app = app().await;
    let body = r#"{"resource_id":"45678","resource_id_type":"User","event_type":"patient.merged","changed_fields":[],"destination_user_id":"1234","source_user_id":"5678"}"#;
    let reply = app.send(signed(body)).await;
    let item = app.item(reply.inbox_id()).await;
    assert_eq!(item.resource_id.as_deref(), Some("1234"));
    assert_eq!(item.body, body);
}

#[tokio::test]
async fn a_wrong_content_type_is_415_with_a_message() {
    let app = app().await;
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let (digest, sig) = signature::sign(
            HEALTHIE_SECRET.as_bytes(),
            PUBLIC_PATH,
            "",
            PATIENT_UPDATED.as_bytes(),
        );
        let mut request = Request::post("/webhooks/healthie")
            .header("content-digest", digest)
            .header("signature", sig);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let reply = app
            .send(request.body(Body::from(PATIENT_UPDATED)).unwrap())
            .await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert_eq!(reply.error(), "content type must be application/json");
    }
    assert_eq!(app.inbox_total().await, 0);
    let mut request = signed(PATIENT_UPDATED);
    request.headers_mut().insert(
        "content-type",
        "application/json; charset=utf-8".parse().unwrap(),
    );
    assert_eq!(app.send(request).await.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn malformed_signed_bodies_are_400_with_a_message_and_store_nothing() {
    let app = app().await;
    let cases: [(&[u8], &str); 6] = [
        (b"{\"resource_id\":", "body is not JSON"),
        (b"\xff\xfe{}", "body is not UTF-8"),
        (b"[1,2]", "body must be a JSON object"),
        (
            br#"{"resource_id_type":"User","event_type":"patient.updated"}"#,
            "missing resource_id",
        ),
        (
            br#"{"resource_id":"1","event_type":["patient.updated"]}"#,
            "event_type must be a string",
        ),
        (br#"{"resource_id":"1"}"#, "missing event_type"),
    ];
    for (body, message) in cases {
        let reply = app.send(healthie(body, HEALTHIE_SECRET, "")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{message}");
        assert_eq!(reply.error(), message);
    }
    assert_eq!(app.inbox_total().await, 0);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_stores_nothing() {
    let app = app().await;
    let padding = "x".repeat(BODY_LIMIT);
    let body = format!(r#"{{"resource_id":"1","event_type":"patient.updated","pad":"{padding}"}}"#);
    let mut with_length = signed(&body);
    with_length
        .headers_mut()
        .insert("content-length", body.len().into());
    for request in [signed(&body), with_length] {
        let reply = app.send(request).await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            reply.error(),
            format!("body is larger than {BODY_LIMIT} bytes")
        );
    }
    assert_eq!(app.inbox_total().await, 0);
    assert_eq!(
        app.metrics.counter(
            super::WEBHOOKS_RECEIVED,
            &[("source", "healthie"), ("outcome", "too_large")]
        ),
        2
    );
}

#[tokio::test]
async fn a_store_failure_is_503_so_the_sender_retries() {
    let app = app_with(&[], false).await;
    let reply = app.send(signed(PATIENT_UPDATED)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error(), "inbox unavailable, retry later");
    assert_eq!(
        app.metrics.counter(
            super::WEBHOOKS_RECEIVED,
            &[("source", "healthie"), ("outcome", "error")]
        ),
        1
    );
}

// ---- Hint ----

const HINT_PATIENT: &str = r#"{"id":"evt-abc123","type":"patient.updated","practice_id":"pra-1","created_at":"2026-01-02T03:04:05Z","object":{"id":"pat-9x","first_name":"Ada","email":"ada@example.com"}}"#;

#[tokio::test]
async fn hint_signed_delivery_is_stored_once_and_a_redelivery_is_a_duplicate() {
    let app = app().await;
    let sig = hint_signature(HINT_SECRET, HINT_PATIENT.as_bytes());
    let reply = app.send(hint(HINT_PATIENT, &sig)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    let item = app.item(reply.inbox_id()).await;
    assert_eq!(item.source, SourceKind::Hint);
    assert_eq!(item.event_type, "patient.updated");
    assert_eq!(item.resource_type.as_deref(), Some("patient"));
    assert_eq!(item.resource_id.as_deref(), Some("pat-9x"));
    assert_eq!(item.body, HINT_PATIENT);

    let again = app.send(hint(HINT_PATIENT, &sig)).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["status"], "duplicate");
    assert_eq!(app.inbox_total().await, 1);
    assert_eq!(
        app.metrics.counter(
            super::WEBHOOKS_RECEIVED,
            &[("source", "hint"), ("outcome", "duplicate")]
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_share_commits_and_each_is_stored_or_a_duplicate_exactly_once() {
    let app = app().await;
    // 40 distinct Hint events, each delivered three times at once: the writer batches them
    // together, yet every event is stored once and every other copy answers "duplicate".
    let bodies: Vec<String> = (0..40)
        .map(|i| HINT_PATIENT.replace("evt-abc123", &format!("evt-{i}")))
        .collect();
    let sends = bodies.iter().cycle().take(120).map(|body| {
        let sig = hint_signature(HINT_SECRET, body.as_bytes());
        let request = hint(body, &sig);
        let router = app.router.clone();
        async move { router.oneshot(request).await.unwrap().status() }
    });
    let statuses = futures::future::join_all(sends).await;
    let accepted = statuses
        .iter()
        .filter(|s| **s == StatusCode::ACCEPTED)
        .count();
    let duplicates = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!((accepted, duplicates), (40, 80), "{statuses:?}");
    assert_eq!(app.inbox_total().await, 40);
}

#[tokio::test]
async fn hint_signature_in_uppercase_hex_is_accepted() {
    let app = app().await;
    let sig = hint_signature(HINT_SECRET, HINT_PATIENT.as_bytes());
    let upper = format!("sha256={}", sig["sha256=".len()..].to_uppercase());
    let reply = app.send(hint(HINT_PATIENT, &upper)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn hint_bad_or_missing_signature_is_unauthorized_and_stores_nothing() {
    let app = app().await;
    let good = hint_signature(HINT_SECRET, HINT_PATIENT.as_bytes());
    let changed = HINT_PATIENT.replace("pat-9x", "pat-9y");
    for request in [
        hint(&changed, &good),
        hint(
            HINT_PATIENT,
            &hint_signature("wrong-key", HINT_PATIENT.as_bytes()),
        ),
        hint(HINT_PATIENT, &good["sha256=".len()..]),
        Request::post("/webhooks/hint")
            .header("content-type", "application/json")
            .body(Body::from(HINT_PATIENT))
            .unwrap(),
    ] {
        let reply = app.send(request).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(reply.error(), "invalid signature");
    }
    assert_eq!(app.inbox_total().await, 0);
}

#[tokio::test]
async fn hint_membership_routes_to_its_patient_and_unknown_types_are_ignored() {
    let app = app().await;
    let membership = r#"{"id":"evt-m1","type":"membership.created","practice_id":"pra-1","object":{"id":"mem-1","owner":{"id":"pat-1"},"membership_patients":[{"patient":{"id":"pat-2"}}]}}"#;
    let reply = app
        .send(hint(
            membership,
            &hint_signature(HINT_SECRET, membership.as_bytes()),
        ))
        .await;
    let item = app.item(reply.inbox_id()).await;
    assert_eq!(item.resource_type.as_deref(), Some("membership"));
    assert_eq!(item.resource_id.as_deref(), Some("pat-1"));

    let unknown = r#"{"id":"evt-u1","type":"signup_attempt.created","practice_id":"pra-1","object":{"id":"sa-1"}}"#;
    let reply = app
        .send(hint(
            unknown,
            &hint_signature(HINT_SECRET, unknown.as_bytes()),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.json()["status"], "ignored");
    let item = app.item(reply.inbox_id()).await;
    assert_eq!(item.state, InboxState::Ignored);
    assert_eq!(
        item.reason.as_deref(),
        Some("event type signup_attempt.created not handled")
    );
}

#[tokio::test]
async fn hint_event_without_an_id_is_400() {
    let app = app().await;
    let body = r#"{"type":"patient.updated","object":{"id":"pat-1"}}"#;
    let reply = app
        .send(hint(body, &hint_signature(HINT_SECRET, body.as_bytes())))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error(), "missing id");
}

// ---- IntakeQ ----

#[tokio::test]
async fn intakeq_delivery_with_the_right_token_is_stored_for_its_client() {
    let app = app().await;
    let body = r#"{"IntakeId":"i-1","Type":"Intake Submitted","ClientId":1234,"PracticeId":"p-1","ExternalClientId":null}"#;
    let reply = app.send(intakeq(INTAKEQ_TOKEN, body)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    let item = app.item(reply.inbox_id()).await;
    assert_eq!(item.source, SourceKind::Intakeq);
    assert_eq!(item.event_type, "Intake Submitted");
    assert_eq!(item.resource_type.as_deref(), Some("Client"));
    assert_eq!(item.resource_id.as_deref(), Some("1234"));

    let appointment = r#"{"EventType":"AppointmentCanceled","ActionPerformedByClient":true,"Appointment":{"Id":"a-1","ClientId":"99"}}"#;
    let item = app
        .item(
            app.send(intakeq(INTAKEQ_TOKEN, appointment))
                .await
                .inbox_id(),
        )
        .await;
    assert_eq!(item.resource_id.as_deref(), Some("99"));

    let reply = app
        .send(intakeq(INTAKEQ_TOKEN, r#"{"Type":"Other"}"#))
        .await;
    assert_eq!(reply.json()["status"], "ignored");
    let item = app.item(reply.inbox_id()).await;
    assert_eq!(item.reason.as_deref(), Some("no ClientId in payload"));
}

#[tokio::test]
async fn intakeq_wrong_or_unconfigured_token_is_404_and_stores_nothing() {
    let app = app().await;
    let body = r#"{"Type":"Intake Submitted","ClientId":1}"#;
    for token in ["nope", "iq-token-5f1c0a7", "iq-token-5f1c0a7e0", "%ZZ"] {
        let reply = app.send(intakeq(token, body)).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{token}");
    }
    let unconfigured = app_with(
        &[("PATIENT_SYNC_SOURCES__INTAKEQ__WEBHOOK_TOKEN", "")],
        true,
    )
    .await;
    let reply = unconfigured.send(intakeq("", body)).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = unconfigured.send(intakeq(INTAKEQ_TOKEN, body)).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(app.inbox_total().await, 0);
    assert_eq!(unconfigured.inbox_total().await, 0);
}

// ---- all sources ----

#[tokio::test]
async fn a_disabled_source_answers_404_and_stores_nothing() {
    let app = app_with(
        &[
            ("PATIENT_SYNC_SOURCES__HEALTHIE__ENABLED", "false"),
            ("PATIENT_SYNC_SOURCES__HINT__ENABLED", "false"),
            ("PATIENT_SYNC_SOURCES__INTAKEQ__ENABLED", "false"),
        ],
        true,
    )
    .await;
    let hint_sig = hint_signature(HINT_SECRET, HINT_PATIENT.as_bytes());
    for request in [
        signed(PATIENT_UPDATED),
        hint(HINT_PATIENT, &hint_sig),
        intakeq(INTAKEQ_TOKEN, r#"{"ClientId":1}"#),
    ] {
        let reply = app.send(request).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        assert_eq!(reply.error(), "not found");
    }
    assert_eq!(app.inbox_total().await, 0);
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = app().await;
    let reply = app.get("/healthz").await;
    assert_eq!((reply.status, reply.text.as_str()), (StatusCode::OK, "ok"));
    let reply = app.get("/readyz").await;
    assert_eq!(reply.status, StatusCode::OK);
    let broken = app_with(&[], false).await;
    assert_eq!(
        broken.get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(broken.get("/healthz").await.status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_text_carries_delivery_counters_and_inbox_gauges() {
    let app = app().await;
    app.send(signed(PATIENT_UPDATED)).await;
    app.send(healthie(PATIENT_UPDATED.as_bytes(), "wrong", ""))
        .await;
    let reply = app.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        reply.content_type
    );
    for line in [
        "# TYPE patient_sync_webhooks_received_total counter",
        r#"patient_sync_webhooks_received_total{source="healthie",outcome="accepted"} 1"#,
        r#"patient_sync_webhooks_received_total{source="healthie",outcome="unauthorized"} 1"#,
        r#"patient_sync_inbox_items{source="healthie",state="pending"} 1"#,
        r#"patient_sync_inbox_items{source="hint",state="pending"} 0"#,
        "# TYPE patient_sync_inbox_oldest_pending_age_seconds gauge",
        r#"patient_sync_webhook_ack_seconds_count{source="healthie"} 2"#,
    ] {
        assert!(
            reply.text.contains(line),
            "missing {line:?} in\n{}",
            reply.text
        );
    }
}

// ---- no PHI ----

/// A log sink for one test thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Captures every log line and span of this thread (the test's current-thread runtime).
///
/// tracing caches per callsite whether anyone listens. With a single scoped dispatcher it
/// computes that cache from the registering thread's own default, so a callsite first hit by a
/// parallel test would stay "never" for this thread too. A second, silent dispatcher that lives
/// for the whole run makes tracing combine every registered dispatcher instead.
fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    static SILENT: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    SILENT.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn no_response_or_log_line_carries_phi_from_a_payload() {
    const PHI: &[&str] = &[
        "Zelda",
        "Fitzgerald",
        "zelda@example.com",
        "1900-07-24",
        "+15550100",
        "12 Gatsby Lane",
    ];
    let (captured, _guard) = capture_logs();
    let app = app().await;
    // Recompute interest for callsites that other tests registered while this one set up.
    tracing::callsite::rebuild_interest_cache();
    let person = r#"{"first_name":"Zelda","last_name":"Fitzgerald","email":"zelda@example.com","dob":"1900-07-24","phone":"+15550100","address":"12 Gatsby Lane"}"#;
    let healthie_bodies = [
        // Accepted, with PHI in an extra key.
        format!(r#"{{"resource_id":"1","event_type":"patient.updated","note":{person}}}"#),
        // PHI where an id or a string should be: the 400 must not quote it.
        format!(r#"{{"resource_id":{person},"event_type":"patient.updated"}}"#),
        r#"{"resource_id":"1","event_type":["Zelda Fitzgerald"]}"#.to_string(),
        r#"{"resource_id":"1","event_type":"patient.updated","changed_fields":{"zelda@example.com":1}}"#.to_string(),
        format!(r#"{{"resource_id":"1","event_type":"patient.updated","x":{person}"#),
    ];
    let hint_bodies = [
        format!(
            r#"{{"id":"evt-p1","type":"patient.created","object":{{"id":"pat-1","profile":{person}}}}}"#
        ),
        format!(r#"{{"id":"evt-p2","type":"patient.created","object":{{"id":{person}}}}}"#),
    ];
    let intakeq_bodies = [format!(
        r#"{{"EventType":"AppointmentCreated","Appointment":{{"ClientId":{person},"ClientName":"Zelda Fitzgerald"}}}}"#
    )];

    let mut replies = Vec::new();
    for body in &healthie_bodies {
        replies.push(app.send(signed(body)).await);
        // Unsigned too: the 401 path logs as well.
        replies.push(app.send(healthie(body.as_bytes(), "wrong", "")).await);
    }
    for body in &hint_bodies {
        replies.push(
            app.send(hint(body, &hint_signature(HINT_SECRET, body.as_bytes())))
                .await,
        );
    }
    for body in &intakeq_bodies {
        replies.push(app.send(intakeq(INTAKEQ_TOKEN, body)).await);
    }
    replies.push(app.get("/metrics").await);

    let statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    assert!(statuses.contains(&202) && statuses.contains(&400) && statuses.contains(&401));
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("stored webhook delivery"),
        "no logs captured:\n{logs}"
    );
    assert!(logs.contains("rejected webhook delivery"), "{logs}");
    for phi in PHI {
        for reply in &replies {
            assert!(
                !reply.text.contains(phi),
                "response carries {phi:?}: {}",
                reply.text
            );
        }
        assert!(!logs.contains(phi), "logs carry {phi:?}:\n{logs}");
    }
    // Nor the IntakeQ token, which sits in the URL.
    assert!(!logs.contains(INTAKEQ_TOKEN));
}
