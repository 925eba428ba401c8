//! The log's output (stderr, or the `--log-file` that SIGHUP reopens) and the bounded
//! queue in front of it: group commit, as PostgreSQL's WAL flush. One writer thread
//! writes every waiting line as one batch and `fdatasync`s it once if it holds a
//! record; a record's caller waits for that up to its deadline and never does I/O,
//! so a stalled output holds up no client past it. A failed batch is retried, with a
//! growing pause, from where its write stopped (after a failed sync, whole).
//!
//! On a pipe (stderr, unsynced), a record of at most `PIPE_BUF` bytes is
//! written by its own thread, lock-free: a pipe takes it whole or not at all,
//! and the pipe gate keeps it out of the middle of a batch.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::describe_io_error;
use crate::{helper_thread, lock};

/// What becomes of a line nobody waits for when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// About the server's life: never dropped.
    Lifecycle,
    /// About turned-away clients, errors, debugging: dropped when full.
    Housekeeping,
}

/// The pause before a failed batch is written again, doubling up to the max.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(10);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// At most this long does a batch wait for more lines (see `commit_delay`).
const MAX_COMMIT_DELAY: Duration = Duration::from_millis(2);

/// What the writer thread tells about the output, without the queue's lock.
pub(crate) trait Observer: Send + Sync {
    /// A write or sync failed; its lines wait to be written again.
    fn failed(&self, error: &io::Error);
    /// A write went through after `failures` failed ones.
    fn recovered(&self, failures: u64);
    /// Reopening the log file failed; the old one is still written.
    fn reopen_failed(&self, error: &io::Error);
    /// `count` housekeeping lines were dropped while the queue was full.
    fn dropped(&self, count: u64);
}

/// A file, or, in the tests, a writer that fails on cue.
pub(crate) trait Sink: Write + Send {
    fn sync_data(&mut self) -> io::Result<()>;

    /// Whether the file was deleted (its last name removed).
    fn unlinked(&self) -> bool;
}

impl Sink for File {
    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn unlinked(&self) -> bool {
        self.metadata().is_ok_and(|meta| meta.nlink() == 0)
    }
}

/// Where the log's bytes go, used by the writer role only.
pub(crate) struct Output {
    file: Box<dyn Sink>,
    /// The log file, reopened on SIGHUP; `None`: stderr.
    path: Option<PathBuf>,
    /// `fdatasync` after each batch that holds a record, where the output is
    /// a regular file (not a pipe, a terminal, `/dev/null`).
    sync: bool,
}

impl Output {
    /// The log file at `path`, or else a duplicate of descriptor 2.
    pub(crate) fn open(path: Option<&Path>, sync: bool) -> io::Result<Output> {
        let file = match path {
            Some(path) => open_log_file(path).map_err(|e| {
                let why = describe_io_error(&e);
                io::Error::new(e.kind(), format!("cannot open {}: {why}", path.display()))
            })?,
            None => File::from(io::stderr().as_fd().try_clone_to_owned()?),
        };
        let sync = sync && file.metadata().is_ok_and(|meta| meta.is_file());
        let (file, path) = (Box::new(file), path.map(Path::to_path_buf));
        Ok(Output { file, path, sync })
    }

    /// stderr as an unsynced pipe, opened again non-blocking: a new open file
    /// description, whose `O_NONBLOCK` is not shared with whoever started us.
    fn unsynced_pipe(&self) -> Option<File> {
        let pipe = self.path.is_none()
            && !self.sync
            && fs::metadata("/proc/self/fd/2").is_ok_and(|meta| meta.file_type().is_fifo());
        let mut open = OpenOptions::new();
        open.write(true).custom_flags(libc::O_NONBLOCK);
        pipe.then(|| open.open("/proc/self/fd/2").ok())?
    }

    /// Opens the log file's path again (logrotate renamed it, or it was
    /// deleted), `first_line` first; the old file is kept on failure.
    fn reopen(&mut self, first_line: &[u8]) -> io::Result<()> {
        if let Some(path) = &self.path {
            let mut file = open_log_file(path)?;
            file.write_all(first_line)?;
            self.file = Box::new(file);
        }
        Ok(())
    }

    /// The log file was deleted: what is written there is in no record, so
    /// the path is opened anew, and the caller writes the batch again.
    fn deleted(&mut self) -> Option<io::Error> {
        self.path.as_ref().filter(|_| self.file.unlinked())?;
        let why = match self.reopen(b"") {
            Ok(()) => "it was deleted; writing to a new one".to_string(),
            Err(e) => format!(
                "it was deleted and cannot be made again: {}",
                describe_io_error(&e)
            ),
        };
        Some(io::Error::new(io::ErrorKind::NotFound, why))
    }
}

/// Appended to (a writer never leaves holes), created if missing, readable
/// by owner and group only (it holds what clients sent). A last line a
/// failing disk left torn gets its newline, so the next line starts afresh.
fn open_log_file(path: &Path) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .append(true)
        .read(true)
        .create(true)
        .mode(0o640)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut last = [0u8; 1];
    if len > 0 && file.read_at(&mut last, len - 1)? == 1 && last[0] != b'\n' {
        file.write_all(b"\n")?;
    }
    Ok(file)
}

pub(crate) struct Queue {
    capacity: usize,
    state: Mutex<State>,
    /// Callers waiting for room or for their line.
    changed: Condvar,
    /// The writer thread, waiting for work.
    work: Condvar,
    /// Used by the writer thread only.
    output: Mutex<Output>,
    /// stderr as a pipe, non-blocking, for records written by their thread.
    pipe: Option<File>,
    /// Shared by such a write, held alone by the writer thread's writes.
    pipe_gate: RwLock<()>,
    /// `State::failures > 0`, read without the lock.
    failing: AtomicBool,
}

type Guard<'a> = MutexGuard<'a, State>;

#[derive(Default)]
struct State {
    /// Lines not yet in a batch, numbered in order from 1.
    waiting: Lines,
    /// A batch whose write or sync failed, to be finished first.
    retry: Option<Lines>,
    /// The number of the last line queued.
    queued: u64,
    /// Every line numbered at most this is written (or was given up).
    done: u64,
    writer_idle: bool,
    /// Failed attempts in a row.
    failures: u64,
    /// Housekeeping lines dropped since the last report, and ever.
    dropped: u64,
    dropped_total: u64,
    /// Set by a stopping server: records stop waiting.
    abandoned: bool,
    /// A reopen asked for (SIGHUP), with the new file's first line.
    reopen: Option<Vec<u8>>,
    /// How long the last synced batch took, when it held more than one
    /// record (clients waiting together): the next batch waits as long for
    /// more lines, so that one sync covers more clients.
    commit_delay: Duration,
}

impl State {
    fn has_work(&self) -> bool {
        !self.waiting.lines.is_empty()
            || self.retry.is_some()
            || self.reopen.is_some()
            || self.dropped > 0
    }

    /// Counts a housekeeping line as dropped if the queue is full.
    fn drops_housekeeping(&mut self, capacity: usize) -> bool {
        let full = self.waiting.lines.len() >= capacity;
        if full {
            self.dropped += 1;
            self.dropped_total += 1;
        }
        full
    }

    fn enqueue(&mut self, bytes: Vec<u8>, record: bool) -> u64 {
        self.queued += 1;
        let number = self.queued;
        self.waiting.lines.push(Line {
            number,
            bytes,
            record,
        });
        number
    }

    /// Empties given-up line `number` wherever no byte of it is written yet.
    fn give_up(&mut self, number: u64) {
        for lines in std::iter::once(&mut self.waiting).chain(&mut self.retry) {
            let mut start = 0;
            for line in &mut lines.lines {
                if line.number == number && start >= lines.written {
                    line.bytes.clear();
                }
                start += line.bytes.len();
            }
        }
    }
}

struct Line {
    number: u64,
    bytes: Vec<u8>,
    /// A record: its batch is synced.
    record: bool,
}

/// Lines waiting, or taken out of the queue to be written together.
#[derive(Default)]
struct Lines {
    lines: Vec<Line>,
    /// Bytes of them written so far.
    written: usize,
}

impl Lines {
    /// Goes back to the start of the line a failed write tore.
    fn rewind_torn_line(&mut self) {
        let ends = self.lines.iter().scan(0, |end, line| {
            *end += line.bytes.len();
            Some(*end)
        });
        let whole = ends.take_while(|end| *end <= self.written).last();
        self.written = whole.unwrap_or(0);
    }

    /// Writes what is left, then syncs if a record is in it (written now or
    /// by an earlier, failed attempt). On an error, `written` says how far
    /// it got; after a failed sync, or in a deleted file, it is all to do.
    fn write_to(&mut self, output: &mut Output) -> io::Result<()> {
        let bytes = self.lines.iter().map(|line| &line.bytes[..]);
        let bytes = bytes.collect::<Vec<_>>().concat();
        while self.written < bytes.len() {
            match output.file.write(&bytes[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.written += written,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let record = |line: &Line| line.record && !line.bytes.is_empty();
        if !(output.sync && self.lines.iter().any(record)) {
            return Ok(());
        }
        if let Some(lost) = output.file.sync_data().err().or_else(|| output.deleted()) {
            self.written = 0;
            return Err(lost);
        }
        Ok(())
    }
}

impl Queue {
    pub(crate) fn new(capacity: usize, output: Output) -> Self {
        Queue {
            capacity,
            state: Mutex::default(),
            changed: Condvar::new(),
            work: Condvar::new(),
            pipe: output.unsynced_pipe(),
            pipe_gate: RwLock::new(()),
            output: Mutex::new(output),
            failing: AtomicBool::new(false),
        }
    }

    fn unlocked<'a, T>(&'a self, state: Guard<'a>, f: impl FnOnce() -> T) -> (Guard<'a>, T) {
        drop(state);
        let result = f();
        (lock(&self.state), result)
    }

    /// Whether a housekeeping line would be dropped now (counted if so).
    pub(crate) fn drops_housekeeping(&self) -> bool {
        lock(&self.state).drops_housekeeping(self.capacity)
    }

    pub(crate) fn dropped_total(&self) -> u64 {
        lock(&self.state).dropped_total
    }

    /// Queues a line that nobody waits for.
    pub(crate) fn push(&self, bytes: Vec<u8>, class: Class) {
        let mut state = lock(&self.state);
        if class == Class::Housekeeping && state.drops_housekeeping(self.capacity) {
            return;
        }
        state.enqueue(bytes, false);
        self.wake_writer(&state);
    }

    /// Queues a record and waits until it is written and synced; gives up
    /// after `timeout` (its line taken out if no byte of it is written).
    pub(crate) fn push_and_wait(&self, bytes: Vec<u8>, timeout: Duration) -> io::Result<()> {
        if self.write_to_pipe(&bytes) {
            return Ok(());
        }
        let (mut bytes, mut number) = (Some(bytes), None);
        let unwritten = |s: &mut State| {
            if let Some(bytes) = bytes.take_if(|_| s.waiting.lines.len() < self.capacity) {
                number = Some(s.enqueue(bytes, true));
                self.wake_writer(s);
            }
            number.is_none_or(|number| s.done < number) && !s.abandoned
        };
        let deadline = Instant::now() + timeout;
        let mut state = self.wait_while(lock(&self.state), deadline, unwritten);
        match number {
            Some(number) if state.done >= number => return Ok(()),
            Some(number) => state.give_up(number),
            None => {}
        }
        if state.abandoned {
            return Err(io::Error::other("the server stopped waiting for the log"));
        }
        let why = format!("the log did not take it within {}s", timeout.as_secs_f64());
        Err(io::Error::new(io::ErrorKind::TimedOut, why))
    }

    /// Writes `bytes` to the pipe whole, if it is one and nobody else writes.
    fn write_to_pipe(&self, bytes: &[u8]) -> bool {
        let Some(mut pipe) = self.pipe.as_ref() else {
            return false;
        };
        let fits = bytes.len() <= libc::PIPE_BUF && !self.failing.load(Ordering::Relaxed);
        let gate = fits.then(|| self.pipe_gate.try_read().ok()).flatten();
        gate.is_some() && pipe.write(bytes).is_ok_and(|n| n == bytes.len())
    }

    /// Waits on `changed` while `waiting` holds, up to `deadline`.
    fn wait_while<'a>(
        &'a self,
        state: Guard<'a>,
        deadline: Instant,
        waiting: impl FnMut(&mut State) -> bool,
    ) -> Guard<'a> {
        let left = deadline.saturating_duration_since(Instant::now());
        let waited = self.changed.wait_timeout_while(state, left, waiting);
        waited.unwrap_or_else(PoisonError::into_inner).0
    }

    fn wake_writer(&self, state: &State) {
        if state.writer_idle {
            self.work.notify_one();
        }
    }

    /// Writes the batch to retry, or else every waiting line, in one go, and
    /// pauses after a failure; returns with the lock held again.
    fn write_batch<'a>(&'a self, mut state: Guard<'a>, observer: &dyn Observer) -> Guard<'a> {
        let was_full = state.waiting.lines.len() >= self.capacity;
        let retry = state.retry.take();
        let mut batch = retry.unwrap_or_else(|| std::mem::take(&mut state.waiting));
        if was_full {
            self.changed.notify_all(); // room for callers waiting for it
        }
        let write = || {
            let _gate = self.pipe.as_ref().map(|_| self.pipe_gate.write());
            let (started, mut output) = (Instant::now(), lock(&self.output));
            let result = batch.write_to(&mut output);
            (result, output.sync.then(|| started.elapsed()))
        };
        let (mut state, (result, synced)) = self.unlocked(state, write);
        let several = batch.lines.iter().filter(|line| line.record).count() > 1;
        let delay = synced.unwrap_or_default().min(MAX_COMMIT_DELAY);
        state.commit_delay = if several { delay } else { Duration::ZERO };
        match result {
            Ok(()) => {
                let last = batch.lines.last().map_or(0, |line| line.number);
                state.done = state.done.max(last);
                if state.failures > 0 && batch.lines.iter().any(|line| !line.bytes.is_empty()) {
                    let failures = std::mem::take(&mut state.failures);
                    self.failing.store(false, Ordering::Relaxed);
                    state = self.unlocked(state, || observer.recovered(failures)).0;
                }
            }
            Err(e) => {
                state.retry = Some(batch);
                state.failures += 1;
                self.failing.store(true, Ordering::Relaxed);
                let doublings = state.failures.saturating_sub(1).min(16) as u32;
                let pause = (FIRST_RETRY_PAUSE * 2u32.pow(doublings)).min(MAX_RETRY_PAUSE);
                state = self.unlocked(state, || observer.failed(&e)).0;
                state = self.unlocked(state, || thread::sleep(pause)).0;
            }
        }
        self.changed.notify_all();
        state
    }

    /// The writer thread: reopens the output when asked, writes the batch to
    /// retry or what waits, reports drops.
    fn serve(&self, observer: &dyn Observer) {
        let mut state = lock(&self.state);
        loop {
            state.writer_idle = true;
            state = self
                .work
                .wait_while(state, |s| !s.has_work())
                .unwrap_or_else(PoisonError::into_inner);
            state.writer_idle = false;
            if let Some(first_line) = state.reopen.take() {
                let reopen = || {
                    let done = lock(&self.output).reopen(&first_line);
                    done.inspect_err(|e| observer.reopen_failed(e)).is_ok()
                };
                let reopened;
                (state, reopened) = self.unlocked(state, reopen);
                // A line torn by a failed write is written whole again in
                // the new file, at once: the new file is why it may work.
                if let (true, Some(batch)) = (reopened, &mut state.retry) {
                    batch.rewind_torn_line();
                }
            }
            if state.retry.is_some() || !state.waiting.lines.is_empty() {
                let delay = state.commit_delay;
                if !delay.is_zero() && state.retry.is_none() {
                    state = self.unlocked(state, || thread::sleep(delay)).0;
                }
                state = self.write_batch(state, observer);
            }
            if state.dropped > 0 && state.waiting.lines.len() < self.capacity {
                let dropped = std::mem::take(&mut state.dropped);
                state = self.unlocked(state, || observer.dropped(dropped)).0;
            }
        }
    }

    /// Asks the writer to reopen the log file between two batches.
    pub(crate) fn reopen(&self, first_line: Vec<u8>) {
        let mut state = lock(&self.state);
        state.reopen = Some(first_line);
        self.wake_writer(&state);
    }

    /// Waits up to `timeout` for every queued line; returns how many are not written.
    pub(crate) fn flush(&self, timeout: Duration) -> u64 {
        let state = lock(&self.state);
        let last = state.queued;
        let state = self.wait_while(state, Instant::now() + timeout, |s| s.done < last);
        state.queued - state.done
    }

    /// Makes records stop waiting, now and from now on.
    pub(crate) fn stop_waiting(&self) {
        lock(&self.state).abandoned = true;
        self.changed.notify_all();
    }

    /// Starts the writer thread, which tells `observer` about the output.
    pub(crate) fn start_writer(&'static self, observer: &'static dyn Observer) -> io::Result<()> {
        helper_thread("log-writer")
            .spawn(move || self.serve(observer))
            .map(drop)
    }

    /// Whether writes are failing now, and the lines not yet written.
    pub(crate) fn failing(&self) -> Option<u64> {
        let state = lock(&self.state);
        (state.failures > 0).then_some(state.queued - state.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const LONG: Duration = Duration::from_secs(20);

    /// A sink that fails, stalls or takes part of a write on cue.
    #[derive(Clone, Default)]
    struct Cued(Arc<Mutex<Cues>>, Arc<AtomicBool>);

    #[derive(Default)]
    struct Cues {
        written: Vec<u8>,
        /// Writes to fail (ENOSPC) from now on.
        failing_writes: usize,
        /// Syncs to fail (EIO) from now on.
        failing_syncs: usize,
        /// The next write takes at most this many bytes.
        short_write: Option<usize>,
        /// What happened, in order: "write", "sync", "fail".
        events: Vec<&'static str>,
    }

    impl Cued {
        fn cues(&self) -> MutexGuard<'_, Cues> {
            lock(&self.0)
        }

        fn stall(&self, stalled: bool) {
            self.1.store(stalled, Ordering::SeqCst);
        }

        fn text(&self) -> String {
            String::from_utf8(self.cues().written.clone()).unwrap()
        }
    }

    impl Write for Cued {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            while self.1.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
            }
            let mut cues = self.cues();
            let short = cues.short_write.take();
            if short.is_none() && cues.failing_writes > 0 {
                cues.failing_writes -= 1;
                cues.events.push("fail");
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = short.unwrap_or(bytes.len()).min(bytes.len());
            cues.written.extend_from_slice(&bytes[..n]);
            cues.events.push("write");
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink for Cued {
        fn sync_data(&mut self) -> io::Result<()> {
            let mut cues = self.cues();
            if cues.failing_syncs > 0 {
                cues.failing_syncs -= 1;
                cues.events.push("fail");
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            cues.events.push("sync");
            Ok(())
        }

        fn unlinked(&self) -> bool {
            false
        }
    }

    /// Counts what the queue reports.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<(u64, u64, u64)>>);

    impl Observer for Seen {
        fn failed(&self, _: &io::Error) {
            lock(&self.0).0 += 1;
        }
        fn recovered(&self, _: u64) {
            lock(&self.0).1 += 1;
        }
        fn reopen_failed(&self, _: &io::Error) {}
        fn dropped(&self, count: u64) {
            lock(&self.0).2 += count;
        }
    }

    fn queue(capacity: usize, sink: &Cued, seen: &Seen) -> &'static Queue {
        let output = Output {
            file: Box::new(sink.clone()),
            path: None,
            sync: true,
        };
        let queue = Box::leak(Box::new(Queue::new(capacity, output)));
        queue
            .start_writer(Box::leak(Box::new(seen.clone())))
            .unwrap();
        queue
    }

    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + LONG;
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_record_is_written_and_synced_before_its_caller_returns() {
        let (sink, seen) = (Cued::default(), Seen::default());
        let queue = queue(4, &sink, &seen);
        queue.push_and_wait(b"one\n".to_vec(), LONG).unwrap();
        assert_eq!(sink.text(), "one\n");
        assert_eq!(sink.cues().events, ["write", "sync"]);
        // A line nobody waits for is not synced on its own.
        queue.push(b"two\n".to_vec(), Class::Lifecycle);
        assert_eq!(queue.flush(LONG), 0);
        assert_eq!(sink.cues().events, ["write", "sync", "write"]);
    }

    #[test]
    fn records_that_wait_together_share_one_write_and_one_sync() {
        let (sink, seen) = (Cued::default(), Seen::default());
        let queue = queue(64, &sink, &seen);
        sink.stall(true);
        // The writer takes the first record and stalls in the sink; the
        // others queue up behind it.
        let push = |i| thread::spawn(move || queue.push_and_wait(format!("{i}\n").into(), LONG));
        let mut callers = vec![push(0)];
        wait_for("the writer took 0", || queue.output.try_lock().is_err());
        callers.extend((1..8).map(push));
        wait_for("lines queued", || lock(&queue.state).queued == 8);
        sink.stall(false);
        for caller in callers {
            caller.join().unwrap().unwrap();
        }
        let syncs = sink.cues().events.iter().filter(|e| **e == "sync").count();
        assert_eq!(syncs, 2, "{:?}", sink.cues().events);
        let mut lines: Vec<&str> = Vec::new();
        let text = sink.text();
        lines.extend(text.lines());
        lines.sort_unstable();
        assert_eq!(lines, ["0", "1", "2", "3", "4", "5", "6", "7"]);
    }

    #[test]
    fn a_failed_write_is_retried_from_where_it_stopped_and_then_acknowledged() {
        let (sink, seen) = (Cued::default(), Seen::default());
        let queue = queue(4, &sink, &seen);
        {
            // Three bytes go in, then the disk is full for three attempts.
            let mut cues = sink.cues();
            cues.short_write = Some(3);
            cues.failing_writes = 3;
        }
        queue.push_and_wait(b"a reply\n".to_vec(), LONG).unwrap();
        assert_eq!(
            sink.cues().events,
            ["write", "fail", "fail", "fail", "write", "sync"]
        );
        assert_eq!(sink.text(), "a reply\n", "whole, and once");
        assert!(queue.flush(LONG) == 0 && queue.failing().is_none());
        let (failed, recovered, _) = *lock(&seen.0);
        assert!(failed >= 1 && recovered == 1, "{failed} {recovered}");
    }

    #[test]
    fn a_failed_sync_writes_the_batch_again_so_nothing_is_lost() {
        let (sink, seen) = (Cued::default(), Seen::default());
        let queue = queue(4, &sink, &seen);
        sink.cues().failing_syncs = 1;
        queue.push_and_wait(b"kept\n".to_vec(), LONG).unwrap();
        assert_eq!(sink.text(), "kept\nkept\n");
        assert_eq!(sink.cues().events, ["write", "fail", "write", "sync"]);
    }

    #[test]
    fn a_record_not_taken_in_time_is_given_up_and_never_written() {
        let (sink, seen) = (Cued::default(), Seen::default());
        let queue = queue(4, &sink, &seen);
        sink.cues().failing_writes = usize::MAX;
        let given_up = queue.push_and_wait(b"lost\n".to_vec(), Duration::from_millis(50));
        let given_up = given_up.unwrap_err();
        assert_eq!(given_up.kind(), io::ErrorKind::TimedOut);
        assert_eq!(given_up.to_string(), "the log did not take it within 0.05s");
        sink.cues().failing_writes = 0;
        queue.push_and_wait(b"later\n".to_vec(), LONG).unwrap();
        assert_eq!(sink.text(), "later\n");
    }

    #[test]
    fn with_the_sink_stalled_housekeeping_is_dropped_and_lifecycle_queued() {
        let (sink, seen) = (Cued::default(), Seen::default());
        let queue = queue(2, &sink, &seen);
        sink.stall(true);
        queue.push(b"a\n".to_vec(), Class::Housekeeping);
        wait_for("the writer took the line", || {
            queue.output.try_lock().is_err()
        });
        for line in ["b\n", "c\n", "busy\n"] {
            queue.push(line.into(), Class::Housekeeping);
        }
        assert!(queue.drops_housekeeping());
        queue.push(b"stopping\n".to_vec(), Class::Lifecycle);
        sink.stall(false);
        assert_eq!(queue.flush(LONG), 0);
        assert_eq!(sink.text(), "a\nb\nc\nstopping\n");
        wait_for("a drop report", || lock(&seen.0).2 == 2);
        assert_eq!(queue.dropped_total(), 2);
    }

    #[test]
    fn stopping_releases_records_waiting_on_a_stalled_sink() {
        let (sink, seen) = (Cued::default(), Seen::default());
        let queue = queue(1, &sink, &seen);
        sink.stall(true);
        let first = thread::spawn(move || queue.push_and_wait(b"first\n".to_vec(), LONG));
        let second = thread::spawn(move || queue.push_and_wait(b"second\n".to_vec(), LONG));
        wait_for("lines queued", || lock(&queue.state).queued == 2);
        assert_eq!(queue.flush(Duration::from_millis(50)), 2);
        queue.stop_waiting();
        wait_for("nobody released", || {
            first.is_finished() && second.is_finished()
        });
        sink.stall(false);
        let results = [first.join().unwrap(), second.join().unwrap()];
        let abandoned = |result: &io::Result<()>| {
            result
                .as_ref()
                .is_err_and(|e| e.to_string() == "the server stopped waiting for the log")
        };
        assert!(results.iter().any(abandoned), "{results:?}");
    }

    #[test]
    fn a_caller_never_waits_past_its_deadline_for_a_stalled_sink() {
        let (sink, seen) = (Cued::default(), Seen::default());
        let queue = queue(4, &sink, &seen);
        sink.stall(true);
        for line in ["first\n", "second\n"] {
            let started = Instant::now();
            let given_up = queue.push_and_wait(line.into(), Duration::from_millis(50));
            assert_eq!(given_up.unwrap_err().kind(), io::ErrorKind::TimedOut);
            assert!(started.elapsed() < Duration::from_secs(5), "{line}");
        }
        sink.stall(false);
    }

    /// A line written by an attempt that then failed is acknowledged only
    /// after a sync, even when the retry has nothing left to write (the
    /// rest of its batch given up).
    #[test]
    fn a_line_written_before_a_failure_is_synced_before_it_is_acknowledged() {
        let (sink, seen) = (Cued::default(), Seen::default());
        let queue = queue(4, &sink, &seen);
        sink.stall(true);
        queue.push(b"x\n".to_vec(), Class::Lifecycle);
        wait_for("the writer took x", || queue.output.try_lock().is_err());
        let first = thread::spawn(move || queue.push_and_wait(b"first\n".to_vec(), LONG));
        wait_for("first queued", || lock(&queue.state).queued == 2);
        let short = Duration::from_millis(100);
        let second = thread::spawn(move || queue.push_and_wait(b"second\n".to_vec(), short));
        wait_for("second queued", || lock(&queue.state).queued == 3);
        {
            // x goes whole; "first\n" goes, then the disk is full.
            let mut cues = sink.cues();
            cues.short_write = Some(2);
            cues.failing_writes = usize::MAX;
        }
        sink.stall(false);
        wait_for("x written", || sink.text() == "x\n");
        sink.cues().short_write = Some(6);
        assert!(second.join().unwrap().is_err(), "second was never written");
        sink.cues().failing_writes = 0;
        first.join().unwrap().unwrap();
        let events = sink.cues().events.clone();
        assert_eq!(events.last(), Some(&"sync"), "{events:?}");
        assert_eq!(sink.text(), "x\nfirst\n");
    }
}
