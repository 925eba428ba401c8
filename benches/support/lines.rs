//! A child's stderr pipe read on a thread of its own, its lines forwarded
//! over a channel: the benchmark waits on a line as an event (no polling, no
//! sleeps), and the pipe is drained whatever the child writes meanwhile, so
//! a child never blocks on a full pipe.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// Reads `pipe` to its end on a new thread. Lines are sent, in order, up to
/// and including the first one `last_forwarded` accepts; everything after
/// it is read and discarded (as journald would read a service's stderr).
/// The channel disconnects when the pipe closes.
pub fn forward(
    pipe: impl Read + Send + 'static,
    last_forwarded: impl Fn(&str) -> bool + Send + 'static,
) -> Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    thread::Builder::new()
        .name("bench-pipe".to_string())
        .spawn(move || {
            let mut pipe = BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match pipe.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                let last = last_forwarded(&text);
                if sender.send(text).is_err() || last {
                    break;
                }
            }
            let _ = io::copy(&mut pipe, &mut io::sink());
        })
        .expect("start a pipe reader thread");
    receiver
}

/// The first line from `lines` that `wanted` accepts, within `timeout`;
/// otherwise why not, with the lines seen before.
pub fn wait_for(
    lines: &Receiver<String>,
    timeout: Duration,
    wanted: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if wanted(&line) => return Ok(line),
            Ok(line) => seen.push(line),
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!("nothing in {timeout:?}; before: {seen:?}"));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(format!("it closed its stderr; before: {seen:?}"));
            }
        }
    }
}

/// Every line until the pipe closes, within `timeout`.
pub fn rest(lines: &Receiver<String>, timeout: Duration) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + timeout;
    let mut rest = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => rest.push(line),
            Err(RecvTimeoutError::Disconnected) => return Ok(rest),
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!("stderr still open after {timeout:?}"));
            }
        }
    }
}
