//! System calls per session: `strace -f -c -p PID` attached to a running
//! server for a short workload of the benchmark's own, then stopped with
//! SIGINT (sent to that strace, by its PID), on which it detaches and
//! prints its summary table.
//!
//! With `-p`, `-f` attaches every thread the process has (strace says
//! "attached with N threads" once all are), and follows the threads it
//! starts meanwhile, so the count covers the whole process. Under ptrace
//! every call stops the server, so it runs many times slower: counts per
//! session hold, timings do not, and futex counts, which depend on
//! contention, are those of the slowed server.

use std::io;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::child::KillOnDrop;
use crate::lines;

/// How long strace may take to attach to every thread, and to detach and
/// print its summary.
const STRACE_TIMEOUT: Duration = Duration::from_secs(10);

/// One row of strace's summary table.
#[derive(Clone, Debug, PartialEq)]
pub struct SyscallRow {
    pub name: String,
    pub calls: u64,
    pub errors: u64,
}

/// strace's summary: its `total` line and a row per system call.
#[derive(Debug, PartialEq)]
pub struct SyscallCounts {
    pub total: SyscallRow,
    pub by_call: Vec<SyscallRow>,
}

impl SyscallCounts {
    /// Calls to any of the futex family (`futex`, and `futex_wait` and its
    /// kin on kernels that have them).
    pub fn futex_calls(&self) -> u64 {
        self.by_call
            .iter()
            .filter(|row| row.name.starts_with("futex"))
            .map(|row| row.calls)
            .sum()
    }
}

/// Why system calls cannot be counted here, if they cannot.
pub fn unavailable() -> Option<String> {
    match Command::new("strace").arg("-V").output() {
        Ok(output) if output.status.success() => None,
        Ok(output) => Some(format!("strace -V failed: {}", output.status)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Some("strace is not installed (apt-get install strace)".to_string())
        }
        Err(e) => Some(format!("strace cannot be run: {e}")),
    }
}

/// Runs `workload` with strace attached to every thread of process `pid`,
/// and returns strace's counts beside what the workload returned.
pub fn count_during<T>(
    pid: u32,
    workload: impl FnOnce() -> T,
) -> Result<(SyscallCounts, T), String> {
    let mut child = Command::new("strace")
        .args(["-f", "-c", "-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start strace: {e}"))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let mut strace = KillOnDrop(child);
    let lines = lines::forward(stderr, |_| false);
    let attached = format!("Process {pid} attached");
    lines::wait_for(&lines, STRACE_TIMEOUT, |line| line.contains(&attached))
        .map_err(|why| format!("strace did not attach: {why}"))?;
    let result = workload();
    let status = Command::new("kill")
        .args(["-INT", &strace.id().to_string()])
        .status()
        .map_err(|e| format!("cannot run kill: {e}"))?;
    if !status.success() {
        return Err(format!("kill -INT of strace failed: {status}"));
    }
    let summary = lines::rest(&lines, STRACE_TIMEOUT)
        .map_err(|why| format!("strace did not print its summary: {why}"))?;
    let _ = strace.wait();
    let counts = parse_summary(&summary)?;
    Ok((counts, result))
}

/// Parses strace's `-c` table: a heading line, a line of dashes, a row per
/// call, dashes again, and the `total` row. Its columns are right-aligned
/// under the runs of dashes, and a row leaves `errors` blank when there
/// were none, so cells are cut at the dashes' positions and found by their
/// headings (`calls`, `errors`, `syscall`), whatever other columns exist.
pub fn parse_summary(lines: &[String]) -> Result<SyscallCounts, String> {
    let is_rule = |line: &str| line.starts_with('-') && line.chars().all(|c| c == '-' || c == ' ');
    let rules: Vec<usize> = (0..lines.len()).filter(|&i| is_rule(&lines[i])).collect();
    let (&[first, second], Some(heading)) = (
        rules.as_slice(),
        rules.first().and_then(|&i| i.checked_sub(1)),
    ) else {
        return Err(format!("no summary table in strace's output: {lines:?}"));
    };
    let spans = dash_runs(&lines[first]);
    let column = |name: &str| {
        spans
            .iter()
            .position(|&span| cell(&lines[heading], span, &spans) == name)
            .ok_or_else(|| format!("no {name:?} column in {:?}", lines[heading]))
    };
    let (calls, errors, name) = (column("calls")?, column("errors")?, column("syscall")?);
    let row = |line: &str| -> Result<SyscallRow, String> {
        let number = |at: usize| {
            let text = cell(line, spans[at], &spans);
            if text.is_empty() {
                Ok(0)
            } else {
                text.parse()
                    .map_err(|_| format!("not a count: {text:?} in {line:?}"))
            }
        };
        Ok(SyscallRow {
            name: cell(line, spans[name], &spans).to_string(),
            calls: number(calls)?,
            errors: number(errors)?,
        })
    };
    let by_call = lines[first + 1..second]
        .iter()
        .map(|line| row(line))
        .collect::<Result<Vec<_>, _>>()?;
    let total_line = lines
        .get(second + 1)
        .ok_or_else(|| "no total line after the table".to_string())?;
    let total = row(total_line)?;
    if total.name != "total" {
        return Err(format!("expected the total line, got {total:?}"));
    }
    Ok(SyscallCounts { total, by_call })
}

/// (start, end) of each run of dashes in a rule line.
fn dash_runs(rule: &str) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut start = None;
    for (at, c) in rule.char_indices().chain([(rule.len(), ' ')]) {
        match (c == '-', start) {
            (true, None) => start = Some(at),
            (false, Some(from)) => {
                runs.push((from, at));
                start = None;
            }
            _ => {}
        }
    }
    runs
}

/// The text of `line` under `span`, trimmed; the last column runs to the
/// end of the line, as long names overrun its dashes.
fn cell<'l>(line: &'l str, span: (usize, usize), spans: &[(usize, usize)]) -> &'l str {
    let end = if Some(&span) == spans.last() {
        line.len()
    } else {
        span.1.min(line.len())
    };
    line.get(span.0.min(end)..end).unwrap_or("").trim()
}
