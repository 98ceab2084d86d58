//! The command line: subcommands, their arguments, and what each one runs. Exit codes:
//! 0 success; 1 failure; 2 bad configuration or arguments; 3 `sync` finished but a poll failed
//! or items were dead-lettered or left for retry; `resync` stopped early and resumes next time;
//! 4 `resync`: a resync of the source is already running.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::app::{self, Application};
use crate::config::Settings;
use crate::model::{InboxId, PatientId, SourceKey, SourceKind};
use crate::store::{now_ms, InboxState, ReviewState};
use crate::sync::admin::{self, AdminError};

pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_INCOMPLETE: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "patient-sync",
    version,
    about = "Keeps one canonical patient table in step with Healthie, IntakeQ and Hint Health"
)]
pub struct Cli {
    /// Configuration file layered over the built-in defaults (environment variables win over both).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the webhook receiver and the workers until SIGTERM or Ctrl-C.
    Serve,
    /// Poll every enabled source once, drain the inbox, and exit (for cron and systemd timers).
    Sync,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Inbox, dead letters and patient counts.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and replay dead-lettered inbox items.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Serve the fake Healthie API with a synthetic population.
    Sandbox {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: std::net::SocketAddr,
        /// People in the synthetic population.
        #[arg(long, default_value_t = 200)]
        people: usize,
        /// Seed of the synthetic population.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Also send a storm of signed Healthie webhooks to this receiver URL, signed with
        /// `PATIENT_SYNC_SOURCES__HEALTHIE__WEBHOOK_SECRET`.
        #[arg(long, value_name = "URL")]
        send_webhooks: Option<reqwest::Url>,
        /// TOML file of faults to inject, one table per fake (`[healthie]`, `[intakeq]`,
        /// `[hint]`), e.g. `error_500_share = 0.05` (see `sandbox::faults`).
        #[arg(long, value_name = "FILE")]
        faults: Option<std::path::PathBuf>,
    },
    /// Run the sandbox and the service end to end on a fresh SQLite file and print a summary.
    Demo {
        /// Directory for the demo database (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// People in the synthetic population.
        #[arg(long, default_value_t = 120)]
        people: usize,
    },
    /// Resolve uncertain matches: list, accept, reject.
    #[command(subcommand)]
    Review(ReviewCommand),
    /// Link a source record (SOURCE:ID) to a patient; automatic matching never undoes it.
    Link {
        /// The record, e.g. healthie:123.
        record: SourceKey,
        patient_id: String,
    },
    /// Split a source record (SOURCE:ID) off into a new patient of its own.
    Unlink {
        /// The record, e.g. intakeq:456.
        record: SourceKey,
    },
    /// Inspect canonical patients.
    #[command(subcommand)]
    Patient(PatientCommand),
    /// Import a JSON Lines file, one record per line in the source's own API shape.
    Import {
        #[arg(long)]
        source: SourceKind,
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Recompute every link and canonical row from stored source records (no API calls).
    Rebuild {
        /// Report what would change without writing anything.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stream the patients table as CSV or JSON Lines, to stdout or a file.
    Export {
        #[arg(long, value_enum)]
        format: crate::export::ExportFormat,
        /// Write to this file (replaced only when the export is complete) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Also export rows merged into another patient.
        #[arg(long)]
        include_merged: bool,
        /// The table as it was at this time (RFC 3339 or YYYY-MM-DD), from patient_history.
        #[arg(long, value_parser = parse_since)]
        as_of: Option<DateTime<Utc>>,
    },
    /// List every patient of a source (or all enabled ones) and apply them; resumable.
    Resync {
        /// healthie, intakeq, hint or all (every enabled source).
        #[arg(long)]
        source: crate::sync::resync::ResyncTarget,
        /// Fetch and report what would change without writing anything.
        #[arg(long)]
        dry_run: bool,
        /// Abandon an unfinished pass and start over from the first page.
        #[arg(long)]
        restart: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReviewCommand {
    /// List reviews: id, record, candidate patient, score; open ones with both sides' fields.
    List {
        /// Only reviews in this state (default: all).
        #[arg(long)]
        state: Option<ReviewState>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Link the review's record to its candidate patient (an admin decision).
    Accept { id: i64 },
    /// The record is not this patient: never proposed or linked automatically again.
    Reject { id: i64 },
}

#[derive(Debug, Subcommand)]
pub enum PatientCommand {
    /// The canonical row, each field's source record, linked records and link history.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLetters {
    /// List dead-lettered items (ids, source, event type, error kind, HTTP status; no payloads).
    List {
        #[arg(long)]
        source: Option<SourceKind>,
        /// Only items received at or after this time (RFC 3339 or YYYY-MM-DD).
        #[arg(long, value_parser = parse_since)]
        since: Option<DateTime<Utc>>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Put dead-lettered items back in the queue with a fresh attempt budget.
    Retry {
        /// One item by id.
        #[arg(conflicts_with_all = ["all", "since"], required_unless_present_any = ["all", "since"])]
        id: Option<i64>,
        /// Every dead item.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        source: Option<SourceKind>,
        /// Only items received at or after this time (RFC 3339 or YYYY-MM-DD).
        #[arg(long, value_parser = parse_since)]
        since: Option<DateTime<Utc>>,
    },
}

fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight exists")))
        .map_err(|_| "expected RFC 3339 (2026-11-01T00:00:00Z) or YYYY-MM-DD".to_string())
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    crate::telemetry::init(&settings.log);
    match cli.command {
        Command::CheckConfig => {
            print!("{}", settings.to_redacted_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            app::open_store(&settings).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve => {
            let app = Application::build(settings).await?;
            app.run_until_stopped(app::shutdown_on_signals()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync => sync_once(settings).await,
        Command::Status { json } => {
            let store = app::open_store(&settings).await?;
            let status = crate::status::load_status(store.as_ref(), &settings).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.render_text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::DeadLetters(cmd) => dead_letters(settings, cmd).await,
        Command::Sandbox {
            listen,
            people,
            seed,
            send_webhooks,
            faults,
        } => {
            let faults = match faults
                .as_deref()
                .map(crate::sandbox::faults::SourceFaults::load)
            {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
                None => Default::default(),
            };
            let shutdown = app::shutdown_on_signals();
            crate::demo::run_sandbox(
                &settings,
                listen,
                people,
                seed,
                send_webhooks,
                faults,
                shutdown,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { dir, people } => {
            crate::demo::run_demo(settings, dir, people).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Review(cmd) => review(settings, cmd).await,
        Command::Link { record, patient_id } => {
            let store = app::open_store(&settings).await?;
            let identity = settings.identity.to_identity_settings();
            let patient = PatientId(patient_id);
            admin_outcome(
                admin::link_record(store.as_ref(), &record, &patient, &identity, Utc::now()).await,
                |o| print_link(o, "linked"),
            )
        }
        Command::Unlink { record } => {
            let store = app::open_store(&settings).await?;
            let identity = settings.identity.to_identity_settings();
            admin_outcome(
                admin::unlink_record(store.as_ref(), &record, &identity, Utc::now()).await,
                |o| print_link(o, "split off"),
            )
        }
        Command::Patient(PatientCommand::Show { id, json }) => {
            let store = app::open_store(&settings).await?;
            admin_outcome(
                admin::show_patient(store.as_ref(), &PatientId(id)).await,
                |view| {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&view)?);
                    } else {
                        print!("{}", admin::render_patient(&view));
                    }
                    Ok(())
                },
            )
        }
        Command::Import { source, file, json } => import(settings, source, file, json).await,
        Command::Rebuild { dry_run, json } => rebuild(settings, dry_run, json).await,
        Command::Export {
            format,
            out,
            include_merged,
            as_of,
        } => export(settings, format, out, include_merged, as_of).await,
        Command::Resync {
            source,
            dry_run,
            restart,
            json,
        } => {
            let store = app::open_store(&settings).await?;
            let stop = app::shutdown_on_signals();
            let code = crate::sync::resync::run_command(
                &settings, store, source, dry_run, restart, json, stop,
            )
            .await?;
            Ok(ExitCode::from(code))
        }
    }
}

async fn export(
    settings: Settings,
    format: crate::export::ExportFormat,
    out: Option<PathBuf>,
    include_merged: bool,
    as_of: Option<DateTime<Utc>>,
) -> anyhow::Result<ExitCode> {
    let store = app::open_store(&settings).await?;
    let options = crate::export::ExportOptions {
        format,
        include_merged,
        as_of,
        ..Default::default()
    };
    let summary = match &out {
        Some(path) => crate::export::export_to_file(store.as_ref(), &options, path).await,
        None => {
            let stdout = std::io::stdout();
            let mut writer = std::io::BufWriter::new(stdout.lock());
            crate::export::export_patients(store.as_ref(), &options, &mut writer).await
        }
    };
    let summary = match summary {
        Ok(summary) => summary,
        // The reader went away (`export ... | head`): not a failure of the export.
        Err(crate::export::ExportError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            return Ok(ExitCode::SUCCESS)
        }
        Err(e) => return Err(e).context("export failed"),
    };
    eprintln!(
        "exported {} patients{}{}",
        summary.rows,
        if summary.merged_skipped > 0 {
            format!(" ({} merged left out)", summary.merged_skipped)
        } else {
            String::new()
        },
        out.map(|p| format!(" to {}", p.display()))
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints a successful admin result; an admin refusal (unknown id, already decided) is a
/// message and exit code 1, a store failure an error.
fn admin_outcome<T>(
    result: Result<T, AdminError>,
    print: impl FnOnce(T) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    match result {
        Ok(value) => {
            print(value)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(AdminError::Store(e)) => Err(e).context("admin command failed"),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(EXIT_FAILURE))
        }
    }
}

fn print_link(o: admin::LinkOutcome, verb: &str) -> anyhow::Result<()> {
    match &o.previous_patient_id {
        Some(prev) if *prev != o.patient_id => println!(
            "{} {verb}: patient {} (was {}{})",
            o.key,
            o.patient_id,
            prev,
            if o.previous_merged {
                ", now merged into it"
            } else {
                ""
            }
        ),
        _ => println!("{} {verb}: patient {}", o.key, o.patient_id),
    }
    Ok(())
}

async fn review(settings: Settings, cmd: ReviewCommand) -> anyhow::Result<ExitCode> {
    let store = app::open_store(&settings).await?;
    let identity = settings.identity.to_identity_settings();
    match cmd {
        ReviewCommand::List { state, limit, json } => admin_outcome(
            admin::list_reviews(store.as_ref(), state, limit).await,
            |reviews| {
                if json {
                    println!("{}", serde_json::to_string_pretty(&reviews)?);
                } else {
                    print!("{}", admin::render_reviews(&reviews));
                }
                Ok(())
            },
        ),
        ReviewCommand::Accept { id } => admin_outcome(
            admin::accept_review(store.as_ref(), id, &identity, Utc::now()).await,
            |o| print_link(o, "linked"),
        ),
        ReviewCommand::Reject { id } => admin_outcome(
            admin::reject_review(store.as_ref(), id, &identity, Utc::now()).await,
            |r| {
                println!(
                    "review {} rejected: {} will not be linked to {}",
                    r.id, r.key, r.patient_id
                );
                Ok(())
            },
        ),
    }
}

async fn import(
    settings: Settings,
    source: SourceKind,
    file: PathBuf,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let reader = std::fs::File::open(&file)
        .map(std::io::BufReader::new)
        .with_context(|| format!("cannot open {}", file.display()))?;
    let store = app::open_store(&settings).await?;
    let identity = settings.identity.to_identity_settings();
    let client = crate::sync::import::offline_source(&settings, source);
    let summary = crate::sync::import::import_lines(
        store.as_ref(),
        client.as_ref(),
        reader,
        &identity,
        Utc::now(),
    )
    .await
    .context("import failed")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", summary.render_text());
    }
    Ok(ExitCode::SUCCESS)
}

async fn rebuild(settings: Settings, dry_run: bool, json: bool) -> anyhow::Result<ExitCode> {
    let store = app::open_store(&settings).await?;
    let identity = settings.identity.to_identity_settings();
    let options = crate::sync::rebuild::RebuildOptions {
        dry_run,
        ..Default::default()
    };
    let report = crate::sync::rebuild::rebuild(store.as_ref(), &identity, &options, Utc::now())
        .await
        .context("rebuild failed")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_text());
    }
    Ok(ExitCode::SUCCESS)
}

async fn sync_once(settings: Settings) -> anyhow::Result<ExitCode> {
    let mut settings = settings;
    // `sync` serves nothing; bind an ephemeral port so it never collides with a running `serve`.
    settings.server.listen = "127.0.0.1:0".parse().expect("valid address");
    let app = Application::build(settings).await?;
    let mut poll_failed = false;
    for (source, result) in app.poll_all().await {
        match result {
            Ok(s) => println!("poll {source}: {} new items queued", s.queued()),
            Err(e) => {
                poll_failed = true;
                println!("poll {source}: failed ({e}); it resumes from its cursor next time");
            }
        }
    }
    let summary = app.worker().drain().await.context("inbox drain failed")?;
    app::save_budgets(app.store().as_ref(), app.sources()).await?;
    println!(
        "sync: claimed {} items: {} done, {} ignored, {} retried later, {} dead; {} records fetched",
        summary.claimed, summary.done, summary.ignored, summary.retried, summary.dead, summary.fetched
    );
    Ok(if poll_failed || summary.dead > 0 || summary.retried > 0 {
        ExitCode::from(EXIT_INCOMPLETE)
    } else {
        ExitCode::SUCCESS
    })
}

async fn dead_letters(settings: Settings, cmd: DeadLetters) -> anyhow::Result<ExitCode> {
    let store = app::open_store(&settings).await?;
    match cmd {
        DeadLetters::List {
            source,
            since,
            limit,
            json,
        } => {
            let items = store
                .list_inbox(
                    InboxState::Dead,
                    source,
                    since.map(|t| t.timestamp_millis()),
                    limit,
                )
                .await?;
            #[derive(Serialize)]
            struct Row {
                id: i64,
                source: SourceKind,
                event_type: String,
                resource_id: Option<String>,
                attempts: i64,
                error_kind: Option<String>,
                http_status: Option<i64>,
                received_at: Option<DateTime<Utc>>,
            }
            let rows: Vec<Row> = items
                .into_iter()
                .map(|i| Row {
                    id: i.id.0,
                    source: i.source,
                    event_type: i.event_type,
                    resource_id: i.resource_id,
                    attempts: i.attempts,
                    error_kind: i.last_error_kind,
                    http_status: i.last_http_status,
                    received_at: Utc.timestamp_millis_opt(i.received_at_ms).single(),
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no dead letters");
            } else {
                println!(
                    "{:>8}  {:<9} {:<24} {:<14} {:>8}  {:<18} {:>6}  received",
                    "id", "source", "event", "resource", "attempts", "error", "http"
                );
                for r in rows {
                    println!(
                        "{:>8}  {:<9} {:<24} {:<14} {:>8}  {:<18} {:>6}  {}",
                        r.id,
                        r.source.as_str(),
                        r.event_type,
                        r.resource_id.unwrap_or_default(),
                        r.attempts,
                        r.error_kind.unwrap_or_default(),
                        r.http_status.map(|s| s.to_string()).unwrap_or_default(),
                        r.received_at.map(|t| t.to_rfc3339()).unwrap_or_default()
                    );
                }
            }
        }
        DeadLetters::Retry {
            id,
            all: _,
            source,
            since,
        } => {
            let n = store
                .requeue_dead(
                    id.map(InboxId),
                    source,
                    since.map(|t| t.timestamp_millis()),
                    now_ms(),
                )
                .await?;
            println!("requeued {n} dead letters");
        }
    }
    Ok(ExitCode::SUCCESS)
}
