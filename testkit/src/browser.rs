//! Headless Chromium for the dashboard tests, driven through `browser/drive.mjs`
//! (playwright-core with Debian's Chromium; `scripts/setup.sh` installs both).
//!
//! Why a child process speaking JSON lines: the test keeps its logic in Rust, next to the
//! servers it kills and the joins it starts, and the browser side stays a thin shim.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::{err, Error};

pub struct Browser {
    /// Killed when the Browser is dropped (`kill_on_drop`).
    _child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

fn shim() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

impl Browser {
    /// Starts Chromium headless with an empty profile.
    pub async fn start() -> Result<Browser, Error> {
        let dir = shim();
        if !dir.join("node_modules/playwright-core").exists() {
            return Err(err(format!("{} has no node_modules: run scripts/setup.sh", dir.display())));
        }
        let mut child = Command::new("node")
            .arg(dir.join("drive.mjs"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().ok_or_else(|| err("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| err("no stdout"))?;
        Ok(Browser { _child: child, stdin, lines: BufReader::new(stdout).lines() })
    }

    /// Sends one command and returns its value, or the browser's error.
    pub async fn call(&mut self, cmd: Value) -> Result<Value, Error> {
        let mut line = cmd.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        let answer = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .map_err(|_| err(format!("the browser did not answer {cmd} within 60 s")))??
            .ok_or_else(|| err("the browser exited"))?;
        let v: Value = serde_json::from_str(&answer).map_err(|e| err(format!("bad answer {answer:?}: {e}")))?;
        if v["ok"] == json!(true) {
            Ok(v["value"].clone())
        } else {
            Err(err(format!("{}: {}", cmd["op"], v["error"])))
        }
    }

    pub async fn open(&mut self, url: &str) -> Result<(), Error> {
        self.call(json!({"op": "open", "url": url})).await.map(drop)
    }

    pub async fn fill(&mut self, sel: &str, text: &str) -> Result<(), Error> {
        self.call(json!({"op": "fill", "sel": sel, "text": text})).await.map(drop)
    }

    pub async fn click(&mut self, sel: &str) -> Result<(), Error> {
        self.call(json!({"op": "click", "sel": sel})).await.map(drop)
    }

    /// Evaluates a JavaScript expression in the page.
    pub async fn eval(&mut self, js: &str) -> Result<Value, Error> {
        self.call(json!({"op": "eval", "js": js})).await
    }

    /// Waits until the expression is truthy in the page (polled every 100 ms) and returns it.
    pub async fn wait(&mut self, js: &str, timeout: Duration) -> Result<Value, Error> {
        self.call(json!({"op": "wait", "js": js, "timeout_ms": timeout.as_millis() as u64})).await
    }

    pub async fn screenshot(&mut self, path: &std::path::Path) -> Result<(), Error> {
        self.call(json!({"op": "screenshot", "path": path})).await.map(drop)
    }

    /// Sets how later confirm() boxes are answered; returns the messages of those shown so far.
    pub async fn dialogs(&mut self, accept: bool) -> Result<Vec<String>, Error> {
        let v = self.call(json!({"op": "dialogs", "accept": accept})).await?;
        Ok(serde_json::from_value(v).unwrap_or_default())
    }

    /// The responses with a status of 400 or more since the last call ("401 /status", ...).
    pub async fn failed_responses(&mut self) -> Result<Vec<String>, Error> {
        let v = self.call(json!({"op": "failed"})).await?;
        Ok(serde_json::from_value(v).unwrap_or_default())
    }
}
