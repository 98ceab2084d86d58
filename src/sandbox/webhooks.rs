//! Healthie webhooks as Healthie sends them (reference §4): thin envelopes with their type
//! quirks, signed with `sources::healthie::signature::sign`, posted to a receiver; and a
//! generator of realistic event storms (duplicated creates, out-of-order deliveries) that
//! mutates the population so refetches see the new state.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::population::Population;
use crate::model::{SourceKey, SourceKind};
use crate::sources::healthie::signature;

/// An id as the envelope carries it: a JSON string per the event reference, a number per the
/// signing sample (reference §4.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum IdValue {
    Text(String),
    Number(u64),
}

impl IdValue {
    pub fn as_string(&self) -> String {
        match self {
            IdValue::Text(s) => s.clone(),
            IdValue::Number(n) => n.to_string(),
        }
    }
}

impl From<&str> for IdValue {
    fn from(s: &str) -> Self {
        IdValue::Text(s.to_string())
    }
}

/// `changed_fields`: an array per the docs, sometimes a string in practice (reference §4.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ChangedFields {
    List(Vec<String>),
    Text(String),
}

/// A Healthie webhook body. Field order is the docs' order; extra keys appear only on the
/// events that carry them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthieEnvelope {
    pub resource_id: IdValue,
    pub resource_id_type: String,
    pub event_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed_fields: Option<ChangedFields>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_id: Option<IdValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<IdValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_user_id: Option<IdValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_user_id: Option<IdValue>,
}

impl HealthieEnvelope {
    fn base(resource_id: &str, resource_id_type: &str, event_type: &str) -> Self {
        Self {
            resource_id: resource_id.into(),
            resource_id_type: resource_id_type.into(),
            event_type: event_type.into(),
            changed_fields: Some(ChangedFields::List(Vec::new())),
            tag_id: None,
            user_id: None,
            destination_user_id: None,
            source_user_id: None,
        }
    }

    /// `patient.created` / `patient.updated`; `changed_fields` is filled only on updates.
    pub fn patient(event_type: &str, user_id: &str, changed_fields: Vec<String>) -> Self {
        let mut e = Self::base(user_id, "User", event_type);
        e.changed_fields = Some(ChangedFields::List(changed_fields));
        e
    }

    /// `patient.merged`: `resource_id` matches neither user in the docs' example.
    pub fn merged(resource_id: &str, destination_user_id: &str, source_user_id: &str) -> Self {
        let mut e = Self::base(resource_id, "User", "patient.merged");
        e.destination_user_id = Some(destination_user_id.into());
        e.source_user_id = Some(source_user_id.into());
        e
    }

    /// `location.created|updated|deleted`, with the owner's `user_id`.
    pub fn location(event_type: &str, location_id: &str, user_id: &str) -> Self {
        let mut e = Self::base(location_id, "Location", event_type);
        e.user_id = Some(user_id.into());
        e
    }

    /// `applied_tag.created|deleted`, with `tag_id` and `user_id`.
    pub fn applied_tag(
        event_type: &str,
        applied_tag_id: &str,
        tag_id: &str,
        user_id: &str,
    ) -> Self {
        let mut e = Self::base(applied_tag_id, "AppliedTag", event_type);
        e.tag_id = Some(tag_id.into());
        e.user_id = Some(user_id.into());
        e
    }

    /// `test.created`, as `sendTestWebhook` fires it. Its payload is undocumented; this shape
    /// (the webhook's id as the resource) is the sandbox's guess.
    pub fn test_created(webhook_id: &str) -> Self {
        Self::base(webhook_id, "Webhook", "test.created")
    }

    /// The same event with `resource_id` as a JSON number (when it is numeric).
    pub fn with_numeric_resource_id(mut self) -> Self {
        if let Ok(n) = self.resource_id.as_string().parse() {
            self.resource_id = IdValue::Number(n);
        }
        self
    }

    /// The same event with `changed_fields` as a string: a JSON-encoded array, or the names
    /// joined by commas.
    pub fn with_changed_fields_as_string(mut self, json_encoded: bool) -> Self {
        if let Some(ChangedFields::List(list)) = &self.changed_fields {
            let text = if json_encoded {
                serde_json::to_string(list).expect("strings serialize")
            } else {
                list.join(",")
            };
            self.changed_fields = Some(ChangedFields::Text(text));
        }
        self
    }

    /// The body bytes as sent.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("envelope serializes")
    }

    /// The Healthie user this event is about, if any (what a receiver refetches).
    pub fn user_id(&self) -> Option<String> {
        match self.resource_id_type.as_str() {
            "User" if self.event_type == "patient.merged" => {
                self.destination_user_id.as_ref().map(IdValue::as_string)
            }
            "User" => Some(self.resource_id.as_string()),
            _ => self.user_id.as_ref().map(IdValue::as_string),
        }
    }
}

/// One signed delivery: the body and the headers Healthie sets (reference §4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub body: Vec<u8>,
    /// The public path and raw query that were signed.
    pub path: String,
    pub query: String,
    pub content_digest: String,
    pub signature_input: String,
    pub signature: String,
}

/// `Signature-Input` names the signed components; Healthie documents no exact value, so this is
/// RFC 9421 style with the components of the signing string.
pub const SIGNATURE_INPUT: &str =
    r#"sig1=("@method" "@path" "@query" "content-digest" "content-type" "content-length")"#;

/// Posts signed Healthie webhooks to one receiver URL.
#[derive(Debug, Clone)]
pub struct WebhookSender {
    client: reqwest::Client,
    url: reqwest::Url,
    public_path: String,
    secret: Vec<u8>,
}

impl WebhookSender {
    /// Signs with `secret` over the URL's own path and query.
    pub fn new(url: reqwest::Url, secret: impl Into<Vec<u8>>) -> Self {
        Self {
            client: reqwest::Client::new(),
            public_path: url.path().to_string(),
            url,
            secret: secret.into(),
        }
    }

    /// Signs over another path, as when a reverse proxy adds a prefix the receiver never sees.
    pub fn with_public_path(mut self, path: impl Into<String>) -> Self {
        self.public_path = path.into();
        self
    }

    pub fn with_client(mut self, client: reqwest::Client) -> Self {
        self.client = client;
        self
    }

    /// Builds and signs a delivery without sending it.
    pub fn delivery(&self, envelope: &HealthieEnvelope) -> Delivery {
        self.delivery_for_body(envelope.body())
    }

    pub fn delivery_for_body(&self, body: Vec<u8>) -> Delivery {
        let query = self.url.query().unwrap_or("").to_string();
        let (content_digest, signature) =
            signature::sign(&self.secret, &self.public_path, &query, &body);
        Delivery {
            body,
            path: self.public_path.clone(),
            query,
            content_digest,
            signature_input: SIGNATURE_INPUT.to_string(),
            signature,
        }
    }

    /// Signs and posts one event; returns the receiver's HTTP status.
    pub async fn send(
        &self,
        envelope: &HealthieEnvelope,
    ) -> Result<reqwest::StatusCode, reqwest::Error> {
        self.send_delivery(&self.delivery(envelope)).await
    }

    pub async fn send_delivery(
        &self,
        delivery: &Delivery,
    ) -> Result<reqwest::StatusCode, reqwest::Error> {
        let response = self
            .client
            .post(self.url.clone())
            .header("Content-Type", "application/json")
            .header("Content-Digest", &delivery.content_digest)
            .header("Signature-Input", &delivery.signature_input)
            .header("Signature", &delivery.signature)
            .body(delivery.body.clone())
            .send()
            .await?;
        Ok(response.status())
    }
}

/// The mix of a webhook storm.
#[derive(Debug, Clone, PartialEq)]
pub struct StormConfig {
    pub seed: u64,
    /// New patients (`patient.created`), each delivered `create_deliveries` times.
    pub creates: usize,
    pub create_deliveries: (usize, usize),
    /// Changes to existing patients (`patient.updated`).
    pub updates: usize,
    /// Share of updates delivered twice.
    pub update_duplicate_share: f64,
    /// Archivals (`patient.updated` with `active`; reference §4.2 inference).
    pub archives: usize,
    /// Address changes (`location.updated`, or `location.created` for a first address).
    pub location_changes: usize,
    /// Tags applied (`applied_tag.created`).
    pub tag_changes: usize,
    /// Duplicates created then merged (`patient.merged`).
    pub merges: usize,
    /// Each delivery may swap with one up to this many places later.
    pub reorder_window: usize,
    /// Share of envelopes with `resource_id` as a JSON number.
    pub numeric_id_share: f64,
    /// Share of envelopes with `changed_fields` as a string.
    pub string_changed_fields_share: f64,
}

impl Default for StormConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            creates: 20,
            create_deliveries: (2, 4),
            updates: 60,
            update_duplicate_share: 0.2,
            archives: 3,
            location_changes: 10,
            tag_changes: 5,
            merges: 2,
            reorder_window: 8,
            numeric_id_share: 0.1,
            string_changed_fields_share: 0.05,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Create,
    Update,
    Archive,
    Location,
    Tag,
    Merge,
}

fn random_user(pop: &Population, rng: &mut StdRng, active_only: bool) -> Option<String> {
    let all = pop.table(SourceKind::Healthie).all();
    for _ in 0..64 {
        let r = all.get(rng.gen_range(0..all.len().max(1)))?;
        if !active_only || r.json["active"].as_bool() == Some(true) {
            return Some(r.id.clone());
        }
    }
    None
}

/// Applies a storm's changes to the population and returns the deliveries Healthie would make,
/// duplicated and out of order. Deterministic for a population state and `config.seed`.
pub fn healthie_storm(pop: &mut Population, config: &StormConfig) -> Vec<HealthieEnvelope> {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut ops: Vec<Op> = [
        (Op::Create, config.creates),
        (Op::Update, config.updates),
        (Op::Archive, config.archives),
        (Op::Location, config.location_changes),
        (Op::Tag, config.tag_changes),
        (Op::Merge, config.merges),
    ]
    .iter()
    .flat_map(|(op, n)| std::iter::repeat_n(*op, *n))
    .collect();
    ops.shuffle(&mut rng);
    let mut out = Vec::new();
    for op in ops {
        let (event, copies) = match op {
            Op::Create => {
                let mut systems = pop.draw_systems();
                if !systems.contains(&SourceKind::Healthie) {
                    systems.push(SourceKind::Healthie);
                }
                let created = pop.create_person(&systems);
                let Some(key) = created
                    .records
                    .iter()
                    .find(|k| k.source == SourceKind::Healthie)
                else {
                    continue;
                };
                let (lo, hi) = config.create_deliveries;
                let copies = rng.gen_range(lo.max(1)..=hi.max(lo.max(1)));
                (
                    HealthieEnvelope::patient("patient.created", key.id.as_str(), Vec::new()),
                    copies,
                )
            }
            Op::Update => {
                let Some(id) = random_user(pop, &mut rng, false) else {
                    continue;
                };
                let Some(changed) = pop.touch_healthie(&id) else {
                    continue;
                };
                let copies = 1 + usize::from(rng.gen_bool(config.update_duplicate_share));
                (
                    HealthieEnvelope::patient("patient.updated", &id, changed),
                    copies,
                )
            }
            Op::Archive => {
                let Some(id) = random_user(pop, &mut rng, true) else {
                    continue;
                };
                pop.archive_healthie(&id);
                let fields = vec!["active".to_string()];
                (HealthieEnvelope::patient("patient.updated", &id, fields), 1)
            }
            Op::Location => {
                let Some(id) = random_user(pop, &mut rng, false) else {
                    continue;
                };
                let had = pop
                    .healthie_user(&id)
                    .is_some_and(|u| !u["location"].is_null());
                let Some(location_id) = pop.move_healthie(&id) else {
                    continue;
                };
                let event = if had {
                    "location.updated"
                } else {
                    "location.created"
                };
                let mut e = HealthieEnvelope::location(event, &location_id, &id);
                if event == "location.updated" {
                    e.changed_fields = Some(ChangedFields::List(
                        ["line1", "city", "state", "zip"].map(String::from).to_vec(),
                    ));
                }
                (e, 1)
            }
            Op::Tag => {
                let Some(id) = random_user(pop, &mut rng, false) else {
                    continue;
                };
                let Some(tag_id) = pop.tag_healthie(&id) else {
                    continue;
                };
                let applied = (9_000_000 + rng.gen_range(0..999_999u32)).to_string();
                (
                    HealthieEnvelope::applied_tag("applied_tag.created", &applied, &tag_id, &id),
                    1,
                )
            }
            Op::Merge => {
                let Some(id) = random_user(pop, &mut rng, true) else {
                    continue;
                };
                let source_key = SourceKey::new(SourceKind::Healthie, id.as_str());
                let Some(duplicate) = pop.add_duplicate(&source_key) else {
                    continue;
                };
                // The duplicate's creation is itself delivered before the merge.
                out.push(HealthieEnvelope::patient(
                    "patient.created",
                    duplicate.id.as_str(),
                    Vec::new(),
                ));
                pop.merge_healthie(duplicate.id.as_str(), &id);
                let resource = (500_000 + rng.gen_range(0..99_999u32)).to_string();
                (
                    HealthieEnvelope::merged(&resource, &id, duplicate.id.as_str()),
                    1,
                )
            }
        };
        let event = if rng.gen_bool(config.numeric_id_share.clamp(0.0, 1.0)) {
            event.with_numeric_resource_id()
        } else {
            event
        };
        let event = if event.event_type == "patient.updated"
            && rng.gen_bool(config.string_changed_fields_share.clamp(0.0, 1.0))
        {
            let json_encoded = rng.gen_bool(0.5);
            event.with_changed_fields_as_string(json_encoded)
        } else {
            event
        };
        for _ in 0..copies {
            out.push(event.clone());
        }
    }
    if config.reorder_window > 0 {
        for i in 0..out.len() {
            let j = (i + rng.gen_range(0..=config.reorder_window)).min(out.len() - 1);
            out.swap(i, j);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::population::PopulationConfig;
    use crate::sources::healthie::signature::verify;
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use axum::Router;

    const SECRET: &[u8] = b"whsec_sandbox";

    #[test]
    fn envelopes_serialize_in_the_documented_shapes() {
        let e = HealthieEnvelope::patient(
            "patient.updated",
            "45678",
            vec!["first_name".into(), "email".into()],
        );
        assert_eq!(
            String::from_utf8(e.body()).unwrap(),
            r#"{"resource_id":"45678","resource_id_type":"User","event_type":"patient.updated","changed_fields":["first_name","email"]}"#
        );
        let m = HealthieEnvelope::merged("45678", "1234", "5678");
        assert_eq!(
            String::from_utf8(m.body()).unwrap(),
            r#"{"resource_id":"45678","resource_id_type":"User","event_type":"patient.merged","changed_fields":[],"destination_user_id":"1234","source_user_id":"5678"}"#
        );
        let n = e
            .clone()
            .with_numeric_resource_id()
            .with_changed_fields_as_string(false);
        assert!(String::from_utf8(n.body())
            .unwrap()
            .starts_with(r#"{"resource_id":45678,"#));
        assert_eq!(
            n.changed_fields,
            Some(ChangedFields::Text("first_name,email".into()))
        );
        assert_eq!(m.user_id().as_deref(), Some("1234"));
        let l = HealthieEnvelope::location("location.created", "9", "45678");
        assert_eq!(l.user_id().as_deref(), Some("45678"));
    }

    #[test]
    fn signed_webhook_headers_verify_with_the_receivers_check() {
        let url: reqwest::Url = "https://sync.example/ops/webhooks/healthie/?tenant=a"
            .parse()
            .unwrap();
        let sender = WebhookSender::new(url, SECRET);
        let e = HealthieEnvelope::patient("patient.created", "45678", Vec::new());
        let d = sender.delivery(&e);
        assert_eq!(d.path, "/ops/webhooks/healthie/");
        assert_eq!(d.query, "tenant=a");
        assert!(d.content_digest.starts_with("sha-256="));
        assert!(d.signature.starts_with("sig1="));
        assert!(verify(
            &[SECRET],
            &d.path,
            &d.query,
            &d.body,
            Some(&d.content_digest),
            Some(&d.signature)
        )
        .is_ok());
        assert!(verify(
            &[b"other"],
            &d.path,
            &d.query,
            &d.body,
            Some(&d.content_digest),
            Some(&d.signature)
        )
        .is_err());
    }

    #[tokio::test]
    async fn sender_posts_signed_deliveries_and_returns_the_status() {
        async fn receive(headers: HeaderMap, body: Bytes) -> StatusCode {
            let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
            assert_eq!(h("content-type"), Some("application/json"));
            assert_eq!(h("signature-input"), Some(SIGNATURE_INPUT));
            match verify(
                &[SECRET],
                "/webhooks/healthie",
                "",
                &body,
                h("content-digest"),
                h("signature"),
            ) {
                Ok(()) => StatusCode::NO_CONTENT,
                Err(_) => StatusCode::UNAUTHORIZED,
            }
        }
        let app = Router::new().route("/webhooks/healthie", post(receive));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    rx.await.ok();
                })
                .await
        });
        let url: reqwest::Url = format!("http://{addr}/webhooks/healthie").parse().unwrap();
        let e = HealthieEnvelope::patient("patient.updated", "1", vec!["email".into()]);
        let good = WebhookSender::new(url.clone(), SECRET);
        assert_eq!(good.send(&e).await.unwrap(), StatusCode::NO_CONTENT);
        let bad = WebhookSender::new(url, b"wrong".to_vec());
        assert_eq!(bad.send(&e).await.unwrap(), StatusCode::UNAUTHORIZED);
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn storm_duplicates_creates_and_reorders_deterministically() {
        let config = PopulationConfig {
            people: 200,
            seed: 4,
            ..PopulationConfig::default()
        };
        let storm = StormConfig {
            reorder_window: 4,
            ..StormConfig::default()
        };
        let mut a = Population::generate(&config);
        let mut b = Population::generate(&config);
        let events = healthie_storm(&mut a, &storm);
        assert_eq!(events, healthie_storm(&mut b, &storm));
        let created: Vec<_> = events
            .iter()
            .filter(|e| e.event_type == "patient.created")
            .collect();
        let distinct: std::collections::BTreeSet<String> =
            created.iter().map(|e| e.resource_id.as_string()).collect();
        assert!(created.len() >= 2 * storm.creates);
        assert_eq!(distinct.len(), storm.creates + storm.merges);
        for id in &distinct {
            assert!(a.healthie_user(id).is_some(), "created user {id} is served");
        }
        assert!(events.iter().any(|e| e.event_type == "patient.merged"));
        assert!(events.iter().any(|e| e.event_type.starts_with("location.")));
    }
}
