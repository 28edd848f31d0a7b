//! Helpers for tests that need a real server (PostgreSQL, NATS).
//!
//! On a developer's machine a test whose server is absent is skipped with a
//! printed reason. Under `CI=true` an absent server is a failure: CI must
//! never pass by skipping.

use std::sync::atomic::{AtomicU64, Ordering};

/// The PostgreSQL tests connect to (`SPOKE_TEST_POSTGRES_URL`, default the
/// machine's local server, database `test`).
pub fn postgres_url() -> String {
    std::env::var("SPOKE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".to_owned())
}

/// Whether this run is CI, where missing services fail tests.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns the PostgreSQL URL when the server answers; otherwise skips the
/// test (returns `None` after printing why), or panics under CI.
pub async fn postgres_or_skip(test: &str) -> Option<String> {
    let url = postgres_url();
    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            drop(client);
            Some(url)
        }
        Err(e) if in_ci() => panic!(
            "{test}: PostgreSQL at '{url}' is required under CI=true but cannot be reached: {e}"
        ),
        Err(e) => {
            eprintln!("SKIPPED {test}: PostgreSQL at '{url}' cannot be reached ({e}); set SPOKE_TEST_POSTGRES_URL to run it");
            None
        }
    }
}

/// A name no other test (or test run) uses: `prefix_<pid>_<n>_<random>`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}_{}_{n}_{nanos:x}", std::process::id())
}

/// Runs SQL on the test server, panicking on failure (setup and cleanup).
pub async fn postgres_exec(url: &str, sql: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect for setup");
    tokio::spawn(conn);
    client.batch_execute(sql).await.unwrap_or_else(|e| {
        panic!(
            "setup SQL failed: {}\n{sql}",
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned())
        )
    });
}

/// The NATS server tests use (`SPOKE_TEST_NATS_URL`, default the machine's local server).
pub fn nats_url() -> String {
    std::env::var("SPOKE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// Returns the NATS URL when a JetStream-enabled server answers; otherwise
/// skips (prints why and returns `None`), or panics under CI.
pub async fn nats_or_skip(test: &str) -> Option<String> {
    let url = nats_url();
    let probe = async {
        let client = async_nats::connect(url.as_str())
            .await
            .map_err(|e| e.to_string())?;
        // Account info does not parse against 2.9 servers; a stream round trip works on all.
        let js = async_nats::jetstream::new(client);
        // nats-server 2.9 removes the account's store directory with its
        // last stream; a stream created at that moment (tests run in
        // parallel and clean up after themselves) fails with "could not
        // create storage directory", and the server keeps failing so until
        // it restarts. A small stream that is never deleted keeps the
        // directory.
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "SPOKE_TEST_ANCHOR".to_owned(),
            subjects: vec!["spoke.test.anchor".to_owned()],
            max_messages: 1,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
        let name = unique_name("SPOKE_PROBE");
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![name.to_lowercase()],
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
        js.delete_stream(&name).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), probe).await {
        Ok(Ok(())) => Some(url),
        Ok(Err(e)) if in_ci() => panic!(
            "{test}: NATS JetStream at {url} is required under CI=true but cannot be used: {e}"
        ),
        Err(_) if in_ci() => {
            panic!("{test}: NATS JetStream at {url} is required under CI=true but did not answer")
        }
        Ok(Err(e)) => {
            eprintln!("SKIPPED {test}: NATS JetStream at {url} cannot be used ({e}); set SPOKE_TEST_NATS_URL to run it");
            None
        }
        Err(_) => {
            eprintln!("SKIPPED {test}: NATS JetStream at {url} did not answer; set SPOKE_TEST_NATS_URL to run it");
            None
        }
    }
}

/// Deletes every stream whose name starts with `prefix` (test cleanup).
pub async fn nats_delete_streams(url: &str, prefix: &str) {
    use futures_util::StreamExt;
    let Ok(client) = async_nats::connect(url).await else {
        return;
    };
    let js = async_nats::jetstream::new(client);
    let names: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    for n in names.into_iter().filter(|n| n.starts_with(prefix)) {
        let _ = js.delete_stream(&n).await;
    }
}

/// A port that was free a moment ago on 127.0.0.1, for a server a test
/// starts (a hub, a nats-server, a private PostgreSQL).
///
/// Ports come from below the kernel's ephemeral range (32768 and up), so no
/// outgoing connection can take one between this call and the server's
/// bind, and never twice in one process, so two servers of one test run
/// cannot be handed the same port. (Asking the kernel for port 0 gives
/// neither: two tests once started servers on one port, and a client of
/// one talked to the other.) The start is spread by process id so that
/// test processes running side by side rarely probe the same ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7_919)) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between {LOW} and {}", LOW + SPAN)
}

/// Where the nats-server binary is (`SPOKE_NATS_SERVER`, else on PATH or /usr/sbin).
pub fn nats_server_bin() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("SPOKE_NATS_SERVER") {
        return Some(p.into());
    }
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&format!("{path}:/usr/sbin:/usr/local/bin"))
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// A private nats-server process with JetStream, for tests that restart,
/// kill or reconfigure the server. Killed when dropped.
pub struct NatsServer {
    pub port: u16,
    pub cluster_port: Option<u16>,
    pub store_dir: std::path::PathBuf,
    config_path: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl NatsServer {
    /// Writes `config` (extra nats-server configuration, e.g. an
    /// `authorization` block or a `cluster` block) and starts the server on
    /// `port` with its JetStream store in `store_dir`.
    pub fn start(
        port: u16,
        store_dir: &std::path::Path,
        name: &str,
        extra: &str,
        cluster_port: Option<u16>,
    ) -> Option<NatsServer> {
        let Some(bin) = nats_server_bin() else {
            assert!(
                !in_ci(),
                "nats-server is required under CI=true but was not found (set SPOKE_NATS_SERVER)"
            );
            eprintln!("SKIPPED: nats-server not found (set SPOKE_NATS_SERVER)");
            return None;
        };
        std::fs::create_dir_all(store_dir).expect("store dir");
        let config_path = store_dir.join(format!("{name}.conf"));
        let config = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n{extra}\n",
            store_dir.join(name).display()
        );
        std::fs::write(&config_path, config).expect("write nats config");
        let mut s = NatsServer {
            port,
            cluster_port,
            store_dir: store_dir.to_owned(),
            config_path,
            child: None,
        };
        s.spawn(&bin);
        Some(s)
    }

    fn spawn(&mut self, bin: &std::path::Path) {
        let log = std::fs::File::create(self.config_path.with_extension("log")).expect("log file");
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&self.config_path)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Waits until this server says it is ready and accepts connections
    /// (panics after 15 s, or at once if it exited).
    pub async fn ready(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            // A server that exited (its port taken after all, a bad config)
            // must not be mistaken for whatever else answers on the port.
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "nats-server on port {} exited ({status}) before it was ready:\n{}",
                        self.port,
                        self.log()
                    );
                }
            }
            // Its own log saying so, not a connection to the port, which
            // any other server on it would also accept.
            if self.log().contains("Server is ready")
                && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server on port {} did not start; see {}",
                self.port,
                self.config_path.with_extension("log").display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again with the same config and store.
    pub fn restart(&mut self) {
        self.kill();
        let bin = nats_server_bin().expect("nats-server");
        self.spawn(&bin);
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config_path.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The PostgreSQL server binaries (`SPOKE_PG_BIN`, else the newest under /usr/lib/postgresql).
pub fn postgres_bin_dir() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("SPOKE_PG_BIN") {
        return Some(p.into());
    }
    let mut versions: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("pg_ctl").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// A private PostgreSQL instance (initdb + pg_ctl) on its own port, with
/// `wal_level=logical`, for tests that restart or reconfigure the server.
/// Stopped when dropped. As root, it runs as the `postgres` user.
pub struct PrivatePostgres {
    pub port: u16,
    data: std::path::PathBuf,
    bin: std::path::PathBuf,
    as_postgres: bool,
}

impl PrivatePostgres {
    /// Initialises and starts an instance under `dir`; `None` (skip) when
    /// the binaries are missing outside CI.
    pub fn start(dir: &std::path::Path) -> Option<PrivatePostgres> {
        let Some(bin) = postgres_bin_dir() else {
            assert!(
                !in_ci(),
                "PostgreSQL server binaries are required under CI=true (set SPOKE_PG_BIN)"
            );
            eprintln!("SKIPPED: PostgreSQL server binaries not found (set SPOKE_PG_BIN)");
            return None;
        };
        let data = dir.join("pgdata");
        std::fs::create_dir_all(dir).expect("pg dir");
        let as_postgres = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if as_postgres {
            let status = std::process::Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir)
                .status()
                .expect("chown");
            assert!(
                status.success(),
                "chown {} to postgres failed",
                dir.display()
            );
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                // The postgres user must be able to reach the folder.
                let mut p = dir.to_path_buf();
                while let Some(parent) = p.parent() {
                    if let Ok(meta) = std::fs::metadata(&p) {
                        let mode = meta.permissions().mode();
                        if mode & 0o001 == 0 {
                            let _ = std::fs::set_permissions(
                                &p,
                                std::fs::Permissions::from_mode(mode | 0o711),
                            );
                        }
                    }
                    p = parent.to_path_buf();
                }
            }
        }
        let pg = PrivatePostgres {
            port: free_port(),
            data,
            bin,
            as_postgres,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                pg.data.to_str().expect("utf-8 path"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        pg.pg_ctl_start();
        Some(pg)
    }

    fn command(&self, tool: &str) -> std::process::Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.arg("-u").arg("postgres").arg("--").arg(path);
            c
        } else {
            std::process::Command::new(path)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl_start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10 -c fsync=off",
            self.port
        );
        let log = self.data.with_file_name("postgres.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().expect("utf-8"),
                "-o",
                &opts,
                "-l",
                log.to_str().expect("utf-8"),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// A connection string for the `postgres` database.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// Stops the server at once (like a crash: no checkpoint), then starts it again.
    pub fn crash_restart(&self, down_for: std::time::Duration) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().expect("utf-8"),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        std::thread::sleep(down_for);
        self.pg_ctl_start();
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                self.data.to_str().unwrap_or(""),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}
