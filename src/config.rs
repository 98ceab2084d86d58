//! Configuration: `config/default.toml` (built in), then `--config FILE`, then environment
//! variables `PATIENT_SYNC_<SECTION>__<KEY>`. Secrets come only from the environment or a
//! `<KEY>_FILE` it names, and are typed so that Debug, Display and serialisation redact them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize, Serializer};

/// The built-in defaults, documented key by key.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Environment variable prefix.
pub const ENV_PREFIX: &str = "PATIENT_SYNC_";

/// A secret value. Debug, Display and Serialize print `[redacted]`; only `expose` reveals it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "[redacted]" })
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub server: ServerSettings,
    pub worker: WorkerSettings,
    pub poll: PollSettings,
    pub sources: SourcesSettings,
    pub identity: IdentityConfig,
    pub log: LogSettings,
    pub resync: ResyncSettings,
    pub rate_limit: RateLimitSettings,
}

/// `[identity]`: matching thresholds, trusted ids, shared contacts and survivorship priorities.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub match_threshold: f64,
    pub review_threshold: f64,
    pub trusted_id_systems: Vec<String>,
    pub shared_phones: Vec<String>,
    pub shared_emails: Vec<String>,
    pub default_region: String,
    pub source_priority: Vec<String>,
    #[serde(default)]
    pub field_priority: std::collections::BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub link_without_birth_date: bool,
}

/// Canonical fields survivorship ranks (the address is one unit).
pub const SURVIVORSHIP_FIELDS: &[&str] = &[
    "given_name",
    "middle_name",
    "family_name",
    "preferred_name",
    "birth_date",
    "sex",
    "gender_identity",
    "email",
    "phone",
    "address",
];

impl IdentityConfig {
    /// The matching and survivorship settings every apply, import and rebuild uses. Call after
    /// [`Settings::validate`]; unknown source names were refused there.
    pub fn to_identity_settings(&self) -> crate::sync::apply::IdentitySettings {
        let sources = |names: &[String]| -> Vec<crate::model::SourceKind> {
            names.iter().filter_map(|n| n.parse().ok()).collect()
        };
        crate::sync::apply::IdentitySettings {
            matching: crate::identity::MatchConfig {
                match_threshold: self.match_threshold,
                review_threshold: self.review_threshold,
                trusted_id_systems: self.trusted_id_systems.clone(),
                shared_phones: self.shared_phones.clone(),
                shared_emails: self.shared_emails.clone(),
                default_region: self.default_region.clone(),
                link_without_birth_date: self.link_without_birth_date,
            },
            survivorship: crate::identity::SurvivorshipConfig {
                field_priority: self
                    .field_priority
                    .iter()
                    .map(|(field, order)| (field.clone(), sources(order)))
                    .collect(),
                default_priority: sources(&self.source_priority),
            },
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, why: String| ConfigError::Invalid {
            key: key.to_string(),
            why,
        };
        if !self.match_threshold.is_finite() {
            return Err(invalid(
                "identity.match_threshold",
                "must be a number".into(),
            ));
        }
        if !self.review_threshold.is_finite() || self.review_threshold >= self.match_threshold {
            return Err(invalid(
                "identity.review_threshold",
                "must be below identity.match_threshold".into(),
            ));
        }
        if self.trusted_id_systems.iter().any(|s| s.trim().is_empty()) {
            return Err(invalid(
                "identity.trusted_id_systems",
                "must not contain an empty name".into(),
            ));
        }
        let region = self.default_region.trim();
        if region.len() != 2 || !region.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(invalid(
                "identity.default_region",
                "must be a two-letter ISO 3166 region such as US".into(),
            ));
        }
        fn order(key: &str, names: &[String]) -> Result<(), ConfigError> {
            let mut seen = std::collections::BTreeSet::new();
            for name in names {
                let kind: crate::model::SourceKind =
                    name.parse().map_err(|e: crate::model::UnknownSource| {
                        ConfigError::Invalid {
                            key: key.to_string(),
                            why: e.to_string(),
                        }
                    })?;
                if !seen.insert(kind) {
                    return Err(ConfigError::Invalid {
                        key: key.to_string(),
                        why: format!("{kind} is listed twice"),
                    });
                }
            }
            Ok(())
        }
        order("identity.source_priority", &self.source_priority)?;
        for (field, names) in &self.field_priority {
            let key = format!("identity.field_priority.{field}");
            if !SURVIVORSHIP_FIELDS.contains(&field.as_str()) {
                return Err(invalid(
                    &key,
                    format!(
                        "unknown field (expected one of {})",
                        SURVIVORSHIP_FIELDS.join(", ")
                    ),
                ));
            }
            order(&key, names)?;
        }
        Ok(())
    }
}

/// `[resync]`: full resyncs (`patient-sync resync`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncSettings {
    /// Further completed passes a record stays marked missing before it is deleted.
    pub missing_grace_passes: u32,
    /// Lease of a running resync per source; a crashed run's lease frees after this.
    pub lease_secs: u64,
    /// IntakeQ: a resync stops (resumable) when fewer daily requests than this are left.
    pub daily_budget_reserve: u32,
    /// Seconds between progress log lines when not on a terminal.
    pub progress_log_secs: u64,
}

impl ResyncSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, why: &str| ConfigError::Invalid {
            key: key.to_string(),
            why: why.to_string(),
        };
        if self.missing_grace_passes == 0 {
            return Err(invalid(
                "resync.missing_grace_passes",
                "must be at least 1: one incomplete view of a source never deletes anyone",
            ));
        }
        if self.lease_secs == 0 {
            return Err(invalid("resync.lease_secs", "must be greater than 0"));
        }
        if self.progress_log_secs == 0 {
            return Err(invalid(
                "resync.progress_log_secs",
                "must be greater than 0",
            ));
        }
        Ok(())
    }
}

/// `[rate_limit]`: limits shared by every process using the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Each request also reserves a slot of its credential's limits in the database, so
    /// processes sharing it (replicas, a resync beside `serve`) stay within them together.
    pub shared: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub body_limit_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: u32,
    pub batch_size: u32,
    pub lease_secs: u64,
    pub idle_poll_ms: u64,
    pub max_attempts: u32,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollSettings {
    /// Seconds between incremental polls of every enabled source in `serve`; 0 disables them.
    pub interval_secs: u64,
    /// Seconds between Healthie safety sweeps in `serve` (its `active` and `archived` poll
    /// streams), separate from `interval_secs`; 0 disables them.
    pub healthie_sweep_interval_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesSettings {
    pub healthie: HealthieSettings,
    pub intakeq: IntakeqSettings,
    pub hint: HintSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthieSettings {
    pub enabled: bool,
    pub api_url: String,
    pub api_version: String,
    pub authorization_shard: String,
    pub webhook_public_path: String,
    pub requests_per_second: u32,
    pub burst: u32,
    pub timeout_ms: u64,
    pub batch_size: u32,
    /// Share (0 to below 1) of this key's rate budget kept for live webhook work.
    pub live_reserved_share: f64,
    /// How long a worker whose claim found fewer patients than `batch_size` waits for more
    /// refetches to arrive before fetching (0: never waits).
    pub batch_window_ms: u64,
    #[serde(default, skip_deserializing)]
    pub api_key: Secret,
    /// Every accepted webhook secret (several during rotation).
    #[serde(default, skip_deserializing)]
    pub webhook_secret: Vec<Secret>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeqSettings {
    pub enabled: bool,
    pub base_url: String,
    pub requests_per_minute: u32,
    pub requests_per_day: u32,
    pub timeout_ms: u64,
    /// Share (0 to below 1) of this key's rate and daily budget kept for live webhook work.
    pub live_reserved_share: f64,
    #[serde(default, skip_deserializing)]
    pub api_key: Secret,
    #[serde(default, skip_deserializing)]
    pub webhook_token: Secret,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HintSettings {
    pub enabled: bool,
    pub base_url: String,
    pub requests_per_second: u32,
    pub max_concurrent_requests: u32,
    pub timeout_ms: u64,
    /// Share (0 to below 1) of this key's rate budget and concurrency kept for live webhook work.
    pub live_reserved_share: f64,
    #[serde(default, skip_deserializing)]
    pub api_key: Secret,
    #[serde(default, skip_deserializing)]
    pub webhook_secret: Secret,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Pretty,
}

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Parse(String),
    #[error("invalid value for `{key}`: {why}")]
    Invalid { key: String, why: String },
    #[error(
        "`{key}` is a secret and must come from the environment ({env} or {env}_FILE), not a file"
    )]
    SecretInFile { key: String, env: String },
    #[error("cannot read the secret file for `{key}`")]
    SecretFile {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read config file {path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Secret keys, as dotted paths.
const SECRET_KEYS: &[&str] = &[
    "sources.healthie.api_key",
    "sources.healthie.webhook_secret",
    "sources.intakeq.api_key",
    "sources.intakeq.webhook_token",
    "sources.hint.api_key",
    "sources.hint.webhook_secret",
];

/// The environment variable for a dotted key: `sources.healthie.api_key` ->
/// `PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY`.
pub fn env_var_for(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

fn is_secret_key(key: &str) -> bool {
    let key = key.strip_suffix("_file").unwrap_or(key);
    SECRET_KEYS.contains(&key)
}

impl Settings {
    /// Loads the layers from the process environment.
    pub fn load(config_file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(config_file, &env)
    }

    /// Loads the layers with an explicit environment (tests pass their own).
    pub fn load_from(
        config_file: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = config_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::File {
                path: path.to_path_buf(),
                source,
            })?;
            let file = Figment::from(Toml::string(&text));
            for key in SECRET_KEYS {
                if file.find_value(key).is_ok() || file.find_value(&format!("{key}_file")).is_ok() {
                    return Err(ConfigError::SecretInFile {
                        key: key.to_string(),
                        env: env_var_for(key),
                    });
                }
            }
            figment = figment.merge(Toml::string(&text));
        }
        let plain_env: Vec<(String, String)> = env
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(ENV_PREFIX)?;
                let key = rest.to_ascii_lowercase().replace("__", ".");
                (!is_secret_key(&key)).then(|| (key, v.clone()))
            })
            .collect();
        for (key, value) in &plain_env {
            figment = figment.merge(Figment::new().join((key.as_str(), env_value(value))));
        }
        let mut settings: Settings = figment
            .extract()
            .map_err(|e| ConfigError::Parse(describe_figment_error(e)))?;
        settings.read_secrets(env)?;
        settings.validate()?;
        Ok(settings)
    }

    fn read_secrets(&mut self, env: &[(String, String)]) -> Result<(), ConfigError> {
        let get = |key: &str| -> Result<Option<String>, ConfigError> {
            let var = env_var_for(key);
            if let Some((_, v)) = env.iter().find(|(k, _)| *k == var) {
                return Ok(Some(v.clone()));
            }
            let file_var = format!("{var}_FILE");
            if let Some((_, path)) = env.iter().find(|(k, _)| *k == file_var) {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
                        key: key.to_string(),
                        source,
                    })?;
                return Ok(Some(text.trim().to_string()));
            }
            Ok(None)
        };
        let one = |key: &str| -> Result<Secret, ConfigError> {
            Ok(Secret::new(get(key)?.unwrap_or_default()))
        };
        self.sources.healthie.api_key = one("sources.healthie.api_key")?;
        self.sources.healthie.webhook_secret = get("sources.healthie.webhook_secret")?
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(Secret::new)
                    .collect()
            })
            .unwrap_or_default();
        self.sources.intakeq.api_key = one("sources.intakeq.api_key")?;
        self.sources.intakeq.webhook_token = one("sources.intakeq.webhook_token")?;
        self.sources.hint.api_key = one("sources.hint.api_key")?;
        self.sources.hint.webhook_secret = one("sources.hint.webhook_secret")?;
        Ok(())
    }

    /// Checks values that parse but make no sense, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &str, why: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key: key.to_string(),
                why: why.into(),
            }
        }
        fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
            if value == 0 {
                Err(invalid(key, "must be greater than 0"))
            } else {
                Ok(())
            }
        }
        fn url(key: &str, value: &str) -> Result<(), ConfigError> {
            match reqwest::Url::parse(value) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(()),
                Ok(_) => Err(invalid(key, "must be an http or https url")),
                Err(e) => Err(invalid(key, format!("not a url ({e})"))),
            }
        }
        let db = &self.database.url;
        if !(db.starts_with("sqlite:")
            || db.starts_with("postgres:")
            || db.starts_with("postgresql:"))
        {
            return Err(invalid(
                "database.url",
                "must start with sqlite: or postgres://",
            ));
        }
        positive(
            "database.max_connections",
            self.database.max_connections.into(),
        )?;
        positive(
            "server.body_limit_bytes",
            self.server.body_limit_bytes as u64,
        )?;
        let w = &self.worker;
        positive("worker.concurrency", w.concurrency.into())?;
        positive("worker.batch_size", w.batch_size.into())?;
        positive("worker.lease_secs", w.lease_secs)?;
        positive("worker.idle_poll_ms", w.idle_poll_ms)?;
        positive("worker.max_attempts", w.max_attempts.into())?;
        positive("worker.retry_initial_ms", w.retry_initial_ms)?;
        if w.retry_max_ms < w.retry_initial_ms {
            return Err(invalid(
                "worker.retry_max_ms",
                "must be at least worker.retry_initial_ms",
            ));
        }
        let h = &self.sources.healthie;
        url("sources.healthie.api_url", &h.api_url)?;
        if chrono::NaiveDate::parse_from_str(&h.api_version, "%Y-%m-%d").is_err() {
            return Err(invalid(
                "sources.healthie.api_version",
                "must be a Healthie release date such as 2026-01-01",
            ));
        }
        if !h.webhook_public_path.starts_with('/') {
            return Err(invalid(
                "sources.healthie.webhook_public_path",
                "must start with /",
            ));
        }
        positive(
            "sources.healthie.requests_per_second",
            h.requests_per_second.into(),
        )?;
        positive("sources.healthie.burst", h.burst.into())?;
        positive("sources.healthie.timeout_ms", h.timeout_ms)?;
        positive("sources.healthie.batch_size", h.batch_size.into())?;
        if h.batch_size > 50 {
            return Err(invalid(
                "sources.healthie.batch_size",
                "at most 50 patients fit in one request under Healthie's complexity limit of 2000",
            ));
        }
        let i = &self.sources.intakeq;
        url("sources.intakeq.base_url", &i.base_url)?;
        positive(
            "sources.intakeq.requests_per_minute",
            i.requests_per_minute.into(),
        )?;
        positive(
            "sources.intakeq.requests_per_day",
            i.requests_per_day.into(),
        )?;
        positive("sources.intakeq.timeout_ms", i.timeout_ms)?;
        let n = &self.sources.hint;
        url("sources.hint.base_url", &n.base_url)?;
        positive(
            "sources.hint.requests_per_second",
            n.requests_per_second.into(),
        )?;
        positive(
            "sources.hint.max_concurrent_requests",
            n.max_concurrent_requests.into(),
        )?;
        positive("sources.hint.timeout_ms", n.timeout_ms)?;
        for (key, share) in [
            (
                "sources.healthie.live_reserved_share",
                h.live_reserved_share,
            ),
            ("sources.intakeq.live_reserved_share", i.live_reserved_share),
            ("sources.hint.live_reserved_share", n.live_reserved_share),
        ] {
            if !(0.0..1.0).contains(&share) {
                return Err(invalid(key, "must be at least 0 and below 1"));
            }
        }
        self.identity.validate()?;
        self.resync.validate()?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid("log.level", "not a valid filter (RUST_LOG syntax)"));
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

/// Parses an environment value as a TOML scalar where it is one (numbers, booleans), else as a
/// string, so `PATIENT_SYNC_WORKER__CONCURRENCY=8` is a number and a url stays a string.
fn env_value(raw: &str) -> figment::value::Value {
    use figment::value::Value;
    let trimmed = raw.trim();
    if let Ok(b) = trimmed.parse::<bool>() {
        return Value::from(b);
    }
    if let Ok(n) = trimmed.parse::<i64>() {
        return Value::from(n);
    }
    if let Ok(f) = trimmed.parse::<f64>() {
        if trimmed.contains('.') {
            return Value::from(f);
        }
    }
    Value::from(raw.to_string())
}

fn describe_figment_error(e: figment::Error) -> String {
    e.into_iter()
        .map(|err| {
            let key = err.path.join(".");
            let kind = err.kind.to_string();
            if key.is_empty() {
                format!("invalid configuration: {kind}")
            } else {
                format!("invalid value for `{key}`: {kind}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::load_from(None, &[]).unwrap();
        assert_eq!(s.sources.healthie.api_version, "2026-01-01");
        assert!(s.database.url.starts_with("sqlite:"));
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let s = Settings::load_from(
            None,
            &env(&[
                ("PATIENT_SYNC_DATABASE__URL", "postgres://u@h/db"),
                (
                    "PATIENT_SYNC_SOURCES__HEALTHIE__API_URL",
                    "http://127.0.0.1:9/graphql",
                ),
                ("PATIENT_SYNC_WORKER__CONCURRENCY", "9"),
            ]),
        )
        .unwrap();
        assert_eq!(s.database.url, "postgres://u@h/db");
        assert_eq!(s.sources.healthie.api_url, "http://127.0.0.1:9/graphql");
        assert_eq!(s.worker.concurrency, 9);
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let err = Settings::load_from(None, &env(&[("PATIENT_SYNC_WORKER__CONCURRENCY", "lots")]))
            .unwrap_err();
        assert!(err.to_string().contains("worker.concurrency"), "{err}");
        let err = Settings::load_from(
            None,
            &env(&[("PATIENT_SYNC_SOURCES__HEALTHIE__API_URL", "not a url")]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("sources.healthie.api_url"),
            "{err}"
        );
        let err = Settings::load_from(None, &env(&[("PATIENT_SYNC_SERVER__LISTEN", "nowhere")]))
            .unwrap_err();
        assert!(err.to_string().contains("server.listen"), "{err}");
    }

    #[test]
    fn identity_defaults_match_the_built_in_matching_and_survivorship() {
        let s = Settings::load_from(None, &[]).unwrap();
        let identity = s.identity.to_identity_settings();
        assert_eq!(identity.matching, crate::identity::MatchConfig::default());
        assert_eq!(
            identity.survivorship,
            crate::identity::SurvivorshipConfig::default()
        );
    }

    #[test]
    fn identity_errors_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "[identity]\nreview_threshold = 30.0\n",
                "identity.review_threshold",
            ),
            (
                "[identity]\nsource_priority = [\"healthie\", \"athena\"]\n",
                "identity.source_priority",
            ),
            (
                "[identity]\nsource_priority = [\"hint\", \"hint\"]\n",
                "identity.source_priority",
            ),
            (
                "[identity.field_priority]\nemail = [\"nope\"]\n",
                "identity.field_priority.email",
            ),
            (
                "[identity.field_priority]\nshoe_size = [\"hint\"]\n",
                "identity.field_priority.shoe_size",
            ),
            (
                "[identity]\ndefault_region = \"USA\"\n",
                "identity.default_region",
            ),
        ];
        for (i, (text, key)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("c{i}.toml"));
            std::fs::write(&path, text).unwrap();
            let err = Settings::load_from(Some(&path), &[]).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let path = dir.path().join("ok.toml");
        std::fs::write(
            &path,
            "[identity]\nmatch_threshold = 30.0\nshared_phones = [\"555-0100\"]\n[identity.field_priority]\nemail = [\"intakeq\"]\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&path), &[]).unwrap();
        let identity = s.identity.to_identity_settings();
        assert_eq!(identity.matching.match_threshold, 30.0);
        assert_eq!(
            identity.matching.shared_phones,
            vec!["555-0100".to_string()]
        );
        assert_eq!(
            identity.survivorship.field_priority["email"],
            vec![crate::model::SourceKind::Intakeq]
        );
    }

    #[test]
    fn an_unknown_key_in_a_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[worker]\nconcurency = 3\n").unwrap();
        let err = Settings::load_from(Some(&path), &[]).unwrap_err();
        assert!(err.to_string().contains("concurency"), "{err}");
    }

    #[test]
    fn secrets_come_from_the_environment_or_a_file_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, "file-key\n").unwrap();
        let s = Settings::load_from(
            None,
            &env(&[
                (
                    "PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY_FILE",
                    key_file.to_str().unwrap(),
                ),
                (
                    "PATIENT_SYNC_SOURCES__HEALTHIE__WEBHOOK_SECRET",
                    "whsec_new, whsec_old",
                ),
                ("PATIENT_SYNC_SOURCES__HINT__API_KEY", "12345"),
            ]),
        )
        .unwrap();
        assert_eq!(s.sources.healthie.api_key.expose(), "file-key");
        assert_eq!(s.sources.healthie.webhook_secret.len(), 2);
        assert_eq!(s.sources.hint.api_key.expose(), "12345");
    }

    #[test]
    fn a_secret_in_a_config_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[sources.healthie]\napi_key = \"oops\"\n").unwrap();
        let err = Settings::load_from(Some(&path), &[]).unwrap_err();
        assert!(
            err.to_string().contains("sources.healthie.api_key"),
            "{err}"
        );
        assert!(!err.to_string().contains("oops"));
    }

    #[test]
    fn secrets_are_redacted_in_debug_display_and_check_config() {
        let s = Settings::load_from(
            None,
            &env(&[
                (
                    "PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY",
                    "super-secret-key",
                ),
                ("PATIENT_SYNC_SOURCES__HINT__WEBHOOK_SECRET", "hint-secret"),
            ]),
        )
        .unwrap();
        let debug = format!("{s:?}");
        let shown = s.to_redacted_toml();
        for text in [&debug, &shown, &s.sources.healthie.api_key.to_string()] {
            assert!(!text.contains("super-secret-key"));
            assert!(!text.contains("hint-secret"));
        }
        assert!(shown.contains("[redacted]"));
    }

    #[test]
    fn a_live_reserved_share_outside_0_to_1_is_refused_with_its_key() {
        let s = Settings::load_from(None, &[]).unwrap();
        assert_eq!(s.sources.healthie.live_reserved_share, 0.2);
        assert_eq!(s.sources.intakeq.live_reserved_share, 0.2);
        assert_eq!(s.sources.hint.live_reserved_share, 0.2);
        for (var, key, value) in [
            (
                "PATIENT_SYNC_SOURCES__HEALTHIE__LIVE_RESERVED_SHARE",
                "sources.healthie.live_reserved_share",
                "1.0",
            ),
            (
                "PATIENT_SYNC_SOURCES__INTAKEQ__LIVE_RESERVED_SHARE",
                "sources.intakeq.live_reserved_share",
                "-0.1",
            ),
            (
                "PATIENT_SYNC_SOURCES__HINT__LIVE_RESERVED_SHARE",
                "sources.hint.live_reserved_share",
                "half",
            ),
        ] {
            let err = Settings::load_from(None, &env(&[(var, value)])).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
        let s = Settings::load_from(
            None,
            &env(&[("PATIENT_SYNC_SOURCES__HINT__LIVE_RESERVED_SHARE", "0")]),
        )
        .unwrap();
        assert_eq!(s.sources.hint.live_reserved_share, 0.0);
    }

    #[test]
    fn shared_rate_limits_are_on_by_default_and_a_bad_value_names_its_key() {
        let s = Settings::load_from(None, &[]).unwrap();
        assert!(s.rate_limit.shared);
        let off = env(&[("PATIENT_SYNC_RATE_LIMIT__SHARED", "false")]);
        assert!(!Settings::load_from(None, &off).unwrap().rate_limit.shared);
        let bad = env(&[("PATIENT_SYNC_RATE_LIMIT__SHARED", "sometimes")]);
        let err = Settings::load_from(None, &bad).unwrap_err().to_string();
        assert!(err.contains("`rate_limit.shared`"), "{err}");
    }
}
