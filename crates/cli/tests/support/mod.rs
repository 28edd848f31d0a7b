//! Shared by the process-level tests: a `spoke` child process whose stderr
//! is drained and kept, and which is killed and reaped when dropped, so a
//! failing test leaves nothing running.

// Each test file compiles this module on its own and uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The one-dataset manifest the crash tests share: `items` (n, label?)
/// owned by `owner-svc`, copied by `reader-svc`.
pub const ITEMS_MANIFEST: &str = r#"
[services.owner-svc]
[services.reader-svc]

[datasets.items]
owner = "owner-svc"
key = "id"
fields = { n = "int", label = "string?" }

[[subscriptions]]
consumer = "reader-svc"
dataset = "items"
fields = ["n", "label"]
staleness_budget = "1m"
"#;

/// The run's random seed: `SPOKE_TEST_SEED` when set (to repeat a failed
/// run), else a fresh one; printed either way.
pub fn seed() -> u64 {
    let seed = std::env::var("SPOKE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("seed {seed}");
    seed
}

/// How long to wait for a line a child is expected to print.
pub const LINE_DEADLINE: Duration = Duration::from_secs(120);

pub struct Proc {
    child: Child,
    log: Arc<Mutex<String>>,
    lines: mpsc::Receiver<String>,
    addr: Option<String>,
}

impl Proc {
    /// Starts `spoke ARGS…`.
    pub fn spawn(args: &[&str]) -> Proc {
        Self::spawn_with_env(args, &[])
    }

    /// Starts `spoke ARGS…` with these environment variables set.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_spoke"))
            .args(args)
            .env("SPOKE_LOG", "warn,spoke=info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn spoke");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let sink = log.clone();
        // Drains stderr for the child's whole life, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                let mut log = sink.lock().expect("log");
                log.push_str(&line);
                log.push('\n');
            }
        });
        Proc {
            child,
            log,
            lines,
            addr: None,
        }
    }

    /// Waits for a stderr line containing `needle`; returns the line.
    pub fn wait_line(&self, needle: &str) -> String {
        self.wait_line_within(needle, LINE_DEADLINE)
            .unwrap_or_else(|| panic!("no stderr line with {needle:?}; stderr:\n{}", self.log()))
    }

    /// Waits up to `within` for a stderr line containing `needle`.
    pub fn wait_line_within(&self, needle: &str, within: Duration) -> Option<String> {
        let start = Instant::now();
        while start.elapsed() < within {
            match self.lines.recv_timeout(Duration::from_millis(20)) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        None
    }

    /// Whether the child has exited by itself.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The address from the "listening on http://ADDR" line, once it came.
    pub fn wait_addr(&mut self) -> String {
        if self.addr.is_none() {
            let line = self.wait_line("listening on http://");
            let rest = line
                .split("listening on http://")
                .nth(1)
                .unwrap_or_default();
            self.addr = Some(
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        self.addr.clone().unwrap_or_default()
    }

    /// Everything the child printed on stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
