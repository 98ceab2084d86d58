//! A throwaway Postgres server for the test run, started from the system's binaries (as
//! `nobody` when the tests run as root, since the server refuses root). One server per test
//! process, one fresh database per test; the server dies with the test process and its
//! directory is removed when the process exits (or, after a kill, by the next run). A test that
//! restarts Postgres starts its own [`PgServer`].

use std::io::{BufRead, BufReader};
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

const NOBODY: u32 = 65534;
const DIR_PREFIX: &str = "patient-sync-pg-";
/// The file in a server's directory naming the test process that owns it.
const OWNER_FILE: &str = "owner.pid";

static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// Where the server binaries are: `PSYNC_PG_BINDIR`, `pg_config --bindir`, or the newest
/// `/usr/lib/postgresql/*/bin`.
fn find_bindir() -> Result<PathBuf, String> {
    let has_server = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    if let Ok(dir) = std::env::var("PSYNC_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "PSYNC_PG_BINDIR={} holds no postgres and initdb binaries",
                dir.display()
            ))
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| has_server(d))
        .collect();
    found.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().ok_or_else(|| {
        "no Postgres server binaries found (looked at PSYNC_PG_BINDIR, pg_config --bindir and \
         /usr/lib/postgresql/*/bin): install them, e.g. `apt-get install postgresql-15`, or set \
         PSYNC_PG_BINDIR"
            .to_string()
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn command(bindir: &Path, program: &str) -> Command {
    let mut cmd = Command::new(bindir.join(program));
    if is_root() {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    cmd.env_remove("PGDATA");
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port is available")
}

/// One Postgres server on its own data directory and port. It can be stopped and started
/// again on the same directory and port, as a database restart looks to its clients.
pub struct PgServer {
    bindir: PathBuf,
    root: PathBuf,
    data: PathBuf,
    port: u16,
    /// The running postmaster's pid and a receiver that fires when it has exited.
    running: Mutex<Option<(u32, mpsc::Receiver<()>)>>,
}

impl PgServer {
    /// Creates a data directory with initdb and starts the server on a free port.
    pub fn init() -> Result<Self, String> {
        let bindir = find_bindir()?;
        remove_abandoned_dirs();
        let root = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(|e| format!("cannot create a directory for the test server: {e}"))?
            .keep();
        std::fs::write(root.join(OWNER_FILE), std::process::id().to_string())
            .map_err(|e| format!("cannot write {OWNER_FILE}: {e}"))?;
        let data = root.join("data");
        std::fs::create_dir(&data).map_err(|e| e.to_string())?;
        if is_root() {
            for dir in [&root, &data] {
                chown(dir, Some(NOBODY), Some(NOBODY))
                    .map_err(|e| format!("cannot hand {} to nobody: {e}", dir.display()))?;
            }
        }
        let init = command(&bindir, "initdb")
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"))?;
        if !init.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&init.stderr)
            ));
        }
        let server = Self {
            bindir,
            root,
            data,
            port: free_port(),
            running: Mutex::new(None),
        };
        server.start()?;
        Ok(server)
    }

    /// Starts the server on its data directory and port and waits until it accepts
    /// connections. Does nothing when it is running.
    pub fn start(&self) -> Result<(), String> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.is_some() {
            return Ok(());
        }
        let (ready_tx, ready_rx) = mpsc::channel::<Result<u32, String>>();
        let (exit_tx, exit_rx) = mpsc::channel::<()>();
        let (bindir, data, root, port) = (
            self.bindir.clone(),
            self.data.clone(),
            self.root.clone(),
            self.port,
        );
        // The server is a child of a thread that lives as long as the server, so
        // PR_SET_PDEATHSIG fires only when the whole test process goes away.
        std::thread::spawn(move || {
            let mut cmd = command(&bindir, "postgres");
            cmd.arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-k"])
                .arg(&root)
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=300",
                    "-c",
                    "logging_collector=off",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            // SAFETY: prctl is async-signal-safe and touches only this child process.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot start postgres: {e}")));
                    return;
                }
            };
            let pid = child.id();
            let stderr = child.stderr.take().expect("stderr is piped");
            let mut signalled = false;
            let mut log = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !signalled {
                    log.push(line.clone());
                    if line.contains("ready to accept connections") {
                        let _ = ready_tx.send(Ok(pid));
                        signalled = true;
                    }
                }
            }
            if !signalled {
                let _ = ready_tx.send(Err(format!(
                    "postgres exited before it was ready:\n{}",
                    log.join("\n")
                )));
            }
            let _ = child.wait();
            let _ = exit_tx.send(());
        });
        let pid = ready_rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| "postgres did not become ready within 60 s".to_string())??;
        *running = Some((pid, exit_rx));
        Ok(())
    }

    /// Stops the server with a fast shutdown (open sessions are cut off, as in a restart) and
    /// waits until it has exited.
    pub fn stop(&self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((pid, exited)) = running.take() {
            // SAFETY: kill(2) on the postmaster this value started.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
            // An answer in time or none: `Drop` must not panic, and a server that does not
            // stop still dies with the test process.
            let _ = exited.recv_timeout(Duration::from_secs(60));
        }
    }

    /// A url to a fresh, empty database on this server.
    pub async fn fresh_database(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port);
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
            .await
            .expect("connect to the test server");
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create a test database");
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Removes server directories left by test processes that were killed (a killed process runs
/// no exit hook). A directory whose owner file is missing is taken as abandoned once it is ten
/// minutes old, so one being set up by another process is left alone.
fn remove_abandoned_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(DIR_PREFIX));
        if !is_ours || !path.is_dir() {
            continue;
        }
        let abandoned = match std::fs::read_to_string(path.join(OWNER_FILE)) {
            Ok(pid) => pid
                .trim()
                .parse::<u32>()
                .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()),
            Err(_) => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(600)),
        };
        if abandoned {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Stops the shared server and removes its directory; statics are never dropped, so this runs
/// from the C library's exit hooks.
extern "C" fn remove_shared_server() {
    if let Some(Ok(server)) = SERVER.get() {
        server.stop();
        let _ = std::fs::remove_dir_all(&server.root);
    }
}

fn init_shared_server() -> Result<PgServer, String> {
    let server = PgServer::init()?;
    // SAFETY: registers a function with no arguments that touches only this module's state.
    unsafe { libc::atexit(remove_shared_server) };
    Ok(server)
}

/// A url to a fresh, empty database on the shared test server.
pub async fn fresh_database() -> String {
    match SERVER.get_or_init(init_shared_server) {
        Ok(server) => server.fresh_database().await,
        Err(e) => panic!("cannot start the test Postgres server: {e}"),
    }
}
