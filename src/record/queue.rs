//! The bounded queue between whoever logs and the log's [`Output`], and the
//! one writer at a time that empties it: group commit.
//!
//! A record (a served connection's line) waits until it is written, and
//! synced where the output is a file; a [`Class::Lifecycle`] line is queued
//! at once, even past the bound (a handful over the server's life); a
//! [`Class::Housekeeping`] line is dropped and counted when the queue is
//! full. Whoever waits for its line and finds nobody writing takes the
//! writer role and writes everything waiting in one batch with one
//! `fdatasync`, so an idle server's record costs its own thread one `write`
//! and one sync, and batches grow by themselves under load (PostgreSQL's WAL
//! flush does the same). Lines nobody waits for are written by the writer
//! thread.
//!
//! A batch whose write fails is not delivered: it stays, and the writer
//! thread retries it with a growing pause (a full disk often recovers) from
//! the byte where the write stopped, so no line is cut or written twice; a
//! failed sync writes the whole batch again (a line may then appear twice,
//! none is lost). Its callers wait meanwhile, up to their own deadline; one
//! who gives up has its line taken out if no byte of it is written yet.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::output::Output;
use crate::lock;

/// What becomes of a line nobody waits for when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// About the server's life: never dropped.
    Lifecycle,
    /// About turned-away clients, errors, debugging: dropped when full.
    Housekeeping,
}

/// Why a record was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotWritten {
    /// Its deadline passed first: the output is stalled or failing.
    TimedOut,
    /// The server stopped waiting for the output (a stop's drain ran out).
    Abandoned,
}

/// The pause before a failed batch is written again, doubling up to
/// [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(10);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// What the queue tells about its output; called without the queue's lock.
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

pub(crate) struct Queue {
    capacity: usize,
    state: Mutex<State>,
    /// Callers waiting for room or for their line.
    changed: Condvar,
    /// The writer thread, waiting for work.
    work: Condvar,
    /// Used only by the thread holding the writer role.
    output: Mutex<Output>,
    observer: Box<dyn Observer>,
    /// stderr as a pipe, opened again non-blocking: where a record can be
    /// written by its own thread with no lock (see [`Queue::push_and_wait`]).
    pipe: Option<File>,
    /// Whether writes are failing (`State::failures > 0`), read without
    /// the lock.
    failing: AtomicBool,
}

type Guard<'a> = MutexGuard<'a, State>;

#[derive(Default)]
struct State {
    /// Lines not yet in a batch, numbered in order from 1.
    waiting: VecDeque<Line>,
    /// A batch whose write or sync failed, to be finished first.
    retry: Option<Batch>,
    /// The number of the last line queued.
    queued: u64,
    /// Every line numbered at most this is written (or was given up).
    done: u64,
    /// A thread holds the writer role.
    writing: bool,
    /// Callers waiting on `changed`, so that nobody is woken for nothing.
    callers_waiting: usize,
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
}

impl State {
    fn has_writer_work(&self) -> bool {
        !self.writing
            && (!self.waiting.is_empty()
                || self.retry.is_some()
                || self.reopen.is_some()
                || self.dropped > 0)
    }

    /// Whether a caller may take the writer role: nobody has it, and no
    /// failed batch waits for the writer thread's pause.
    fn writer_free(&self) -> bool {
        !self.writing && self.retry.is_none()
    }

    /// Counts a housekeeping line as dropped if the queue is full.
    fn drops_housekeeping(&mut self, capacity: usize) -> bool {
        let full = self.waiting.len() >= capacity;
        if full {
            self.dropped += 1;
            self.dropped_total += 1;
        }
        full
    }
}

struct Line {
    number: u64,
    bytes: Vec<u8>,
    /// A record: its batch is synced.
    record: bool,
}

/// Lines taken out of the queue to be written together.
#[derive(Default)]
struct Batch {
    lines: Vec<Line>,
    /// Bytes of it written so far.
    written: usize,
}

impl Batch {
    /// Empties given-up line `number` if no byte of it is written yet.
    fn give_up(&mut self, number: u64) {
        let mut start = 0;
        for line in &mut self.lines {
            if line.number == number && start >= self.written {
                line.bytes.clear();
            }
            start += line.bytes.len();
        }
    }

    /// Goes back to the start of the line a failed write tore.
    fn rewind_torn_line(&mut self) {
        let ends = self.lines.iter().scan(0, |end, line| {
            *end += line.bytes.len();
            Some(*end)
        });
        self.written = ends
            .take_while(|end| *end <= self.written)
            .last()
            .unwrap_or(0);
    }

    /// Writes what is left, then syncs if a record is in it; returns the
    /// bytes written. On an error, the batch says how far it got.
    fn write_to(&mut self, output: &mut Output) -> io::Result<usize> {
        let bytes = self
            .lines
            .iter()
            .map(|line| &line.bytes[..])
            .collect::<Vec<_>>()
            .concat();
        let start = self.written;
        while self.written < bytes.len() {
            match output.write(&bytes[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.written += written,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let total = self.written - start;
        if total > 0
            && self.lines.iter().any(|line| line.record)
            && let Err(e) = output.sync()
        {
            // What the failed sync covered may be lost: write it all again.
            self.written = 0;
            return Err(e);
        }
        Ok(total)
    }
}

impl Queue {
    /// A queue of at most `capacity` waiting lines in front of `output`.
    pub(crate) fn new(capacity: usize, output: Output, observer: Box<dyn Observer>) -> Self {
        Queue {
            capacity,
            state: Mutex::default(),
            changed: Condvar::new(),
            work: Condvar::new(),
            pipe: output.unsynced_pipe(),
            output: Mutex::new(output),
            observer,
            failing: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> Guard<'_> {
        lock(&self.state)
    }

    /// Runs `f` without the lock.
    fn unlocked<'a, T>(&'a self, state: Guard<'a>, f: impl FnOnce() -> T) -> (Guard<'a>, T) {
        drop(state);
        let result = f();
        (self.lock(), result)
    }

    /// Runs `f` without the lock, holding the writer role.
    fn as_writer<'a, T>(&'a self, mut state: Guard<'a>, f: impl FnOnce() -> T) -> (Guard<'a>, T) {
        state.writing = true;
        let (mut state, result) = self.unlocked(state, f);
        state.writing = false;
        (state, result)
    }

    /// Whether a housekeeping line would be dropped now (and counts it if
    /// so), so that a caller can skip formatting it.
    pub(crate) fn drops_housekeeping(&self) -> bool {
        self.lock().drops_housekeeping(self.capacity)
    }

    pub(crate) fn dropped_total(&self) -> u64 {
        self.lock().dropped_total
    }

    /// Queues a line that nobody waits for.
    pub(crate) fn push(&self, bytes: Vec<u8>, class: Class) {
        let mut state = self.lock();
        if class == Class::Housekeeping && state.drops_housekeeping(self.capacity) {
            return;
        }
        Self::enqueue(&mut state, bytes, false);
        self.wake_writer_if_needed(&state);
    }

    /// Queues a record and waits until it is written and synced, writing
    /// the queue itself if nobody else is; gives up at `deadline`.
    ///
    /// On a pipe, a record no longer than `PIPE_BUF` is first written by its
    /// own thread, with no lock and nobody to wait for or wake: a pipe takes
    /// such a write whole or not at all, so lines never mix. A pipe that is
    /// full (or failing) sends it the queue's way.
    pub(crate) fn push_and_wait(
        &self,
        bytes: Vec<u8>,
        deadline: Instant,
    ) -> Result<(), NotWritten> {
        if let Some(mut pipe) = self.pipe.as_ref()
            && bytes.len() <= libc::PIPE_BUF
            && !self.failing.load(Ordering::Relaxed)
            && pipe.write(&bytes).is_ok_and(|n| n == bytes.len())
        {
            return Ok(());
        }
        let mut state = self.lock();
        while state.waiting.len() >= self.capacity && !state.abandoned {
            state = self
                .wait(state, deadline)
                .map_err(|_| NotWritten::TimedOut)?;
        }
        let number = Self::enqueue(&mut state, bytes, true);
        let why = loop {
            if state.done >= number {
                return Ok(());
            }
            if state.abandoned {
                break NotWritten::Abandoned;
            }
            if state.writer_free() {
                state = self.write_batch(state);
                continue;
            }
            match self.wait(state, deadline) {
                Ok(next) => state = next,
                Err(timed_out) => {
                    state = timed_out;
                    break NotWritten::TimedOut;
                }
            }
        };
        // Taken out of what is still to be written, if none of it is.
        match state.waiting.iter_mut().find(|line| line.number == number) {
            Some(line) => line.bytes.clear(),
            None => state
                .retry
                .iter_mut()
                .for_each(|batch| batch.give_up(number)),
        }
        Err(why)
    }

    fn enqueue(state: &mut State, bytes: Vec<u8>, record: bool) -> u64 {
        state.queued += 1;
        let number = state.queued;
        state.waiting.push_back(Line {
            number,
            bytes,
            record,
        });
        number
    }

    /// Waits on `changed` until signalled or `deadline`; `Err` at once
    /// when the deadline has passed.
    fn wait<'a>(&'a self, mut state: Guard<'a>, deadline: Instant) -> Result<Guard<'a>, Guard<'a>> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(state);
        }
        state.callers_waiting += 1;
        let (mut state, _) = self
            .changed
            .wait_timeout(state, left)
            .unwrap_or_else(PoisonError::into_inner);
        state.callers_waiting -= 1;
        Ok(state)
    }

    fn wake_writer_if_needed(&self, state: &State) {
        if state.writer_idle && state.has_writer_work() {
            self.work.notify_one();
        }
    }

    /// Takes the writer role and writes the batch to retry, or else every
    /// waiting line, in one go; returns with the lock held again.
    fn write_batch<'a>(&'a self, mut state: Guard<'a>) -> Guard<'a> {
        let mut batch = state.retry.take().unwrap_or_default();
        if batch.lines.is_empty() {
            let was_full = state.waiting.len() >= self.capacity;
            batch.lines.extend(state.waiting.drain(..));
            if was_full && state.callers_waiting > 0 {
                self.changed.notify_all();
            }
        }
        let (mut state, result) = self.as_writer(state, || batch.write_to(&mut lock(&self.output)));
        match result {
            Ok(written) => {
                let last = batch.lines.last().map_or(0, |line| line.number);
                state.done = state.done.max(last);
                // A batch whose lines were all given up proves nothing.
                if written > 0 && state.failures > 0 {
                    let failures = std::mem::take(&mut state.failures);
                    self.failing.store(false, Ordering::Relaxed);
                    state = self.unlocked(state, || self.observer.recovered(failures)).0;
                }
            }
            Err(e) => {
                state.retry = Some(batch);
                state.failures += 1;
                self.failing.store(true, Ordering::Relaxed);
                state = self.unlocked(state, || self.observer.failed(&e)).0;
            }
        }
        if state.callers_waiting > 0 {
            self.changed.notify_all();
        }
        self.wake_writer_if_needed(&state);
        state
    }

    /// The writer thread: reopens the output when asked, retries a failed
    /// batch with a growing pause, writes lines nobody waits for, and
    /// reports dropped lines once there is room again.
    fn serve(&self) {
        let mut state = self.lock();
        loop {
            state.writer_idle = true;
            state = self
                .work
                .wait_while(state, |s| !s.has_writer_work())
                .unwrap_or_else(PoisonError::into_inner);
            state.writer_idle = false;
            let mut reopened = false;
            if let Some(first_line) = state.reopen.take() {
                let reopen = || match lock(&self.output).reopen(&first_line) {
                    Ok(()) => true,
                    Err(e) => {
                        self.observer.reopen_failed(&e);
                        false
                    }
                };
                (state, reopened) = self.as_writer(state, reopen);
                // A line torn by a failed write is written whole again in
                // the new file, at once: the new file is why it may work.
                if let (true, Some(batch)) = (reopened, &mut state.retry) {
                    batch.rewind_torn_line();
                }
            }
            if state.retry.is_some() && !reopened {
                let doublings = state.failures.saturating_sub(1).min(16) as u32;
                let pause = (FIRST_RETRY_PAUSE * 2u32.pow(doublings)).min(MAX_RETRY_PAUSE);
                state = self.as_writer(state, || thread::sleep(pause)).0;
            }
            if state.retry.is_some() || !state.waiting.is_empty() {
                state = self.write_batch(state);
            }
            if state.dropped > 0 && state.waiting.len() < self.capacity {
                let dropped = std::mem::take(&mut state.dropped);
                state = self.unlocked(state, || self.observer.dropped(dropped)).0;
            }
        }
    }

    /// Asks the writer to reopen the output (a log file renamed by
    /// logrotate) between two batches; `first_line` opens the new file.
    pub(crate) fn reopen(&self, first_line: Vec<u8>) {
        let mut state = self.lock();
        state.reopen = Some(first_line);
        self.wake_writer_if_needed(&state);
    }

    /// Waits up to `timeout` for every queued line to be written; returns
    /// how many were not.
    pub(crate) fn flush(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while state.done < state.queued {
            if state.writer_free() {
                state = self.write_batch(state);
                continue;
            }
            match self.wait(state, deadline) {
                Ok(next) => state = next,
                Err(state) => return state.queued - state.done,
            }
        }
        0
    }

    /// Makes records stop waiting, now and from now on.
    pub(crate) fn stop_waiting(&self) {
        self.lock().abandoned = true;
        self.changed.notify_all();
    }

    /// Whether writes are failing now, and the lines not yet written.
    pub(crate) fn failing(&self) -> Option<u64> {
        let state = self.lock();
        (state.failures > 0).then_some(state.queued - state.done)
    }
}

/// Starts the writer thread for a queue that lives as long as the process.
pub(crate) fn start_writer(queue: &'static Queue) -> io::Result<()> {
    thread::Builder::new()
        .name("log-writer".to_string())
        .stack_size(256 * 1024)
        .spawn(move || queue.serve())
        .map(drop)
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

    impl super::super::output::Sink for Cued {
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
        let output = Output::to_sink(sink.clone(), None, true);
        let queue = Box::leak(Box::new(Queue::new(
            capacity,
            output,
            Box::new(seen.clone()),
        )));
        start_writer(queue).unwrap();
        queue
    }

    fn soon() -> Instant {
        Instant::now() + LONG
    }

    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = soon();
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_record_is_written_and_synced_before_its_caller_returns() {
        let (sink, seen) = (Cued::default(), Seen::default());
        let queue = queue(4, &sink, &seen);
        assert_eq!(queue.push_and_wait(b"one\n".to_vec(), soon()), Ok(()));
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
        // The first caller takes the writer role and stalls in the sink;
        // the others queue up behind it.
        let callers: Vec<_> = (0..8)
            .map(|i| thread::spawn(move || queue.push_and_wait(format!("{i}\n").into(), soon())))
            .collect();
        wait_for("lines queued", || queue.lock().queued == 8);
        sink.stall(false);
        for caller in callers {
            assert_eq!(caller.join().unwrap(), Ok(()));
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
        assert_eq!(queue.push_and_wait(b"a reply\n".to_vec(), soon()), Ok(()));
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
        assert_eq!(queue.push_and_wait(b"kept\n".to_vec(), soon()), Ok(()));
        assert_eq!(sink.text(), "kept\nkept\n");
        assert_eq!(sink.cues().events, ["write", "fail", "write", "sync"]);
    }

    #[test]
    fn a_record_not_taken_in_time_is_given_up_and_never_written() {
        let (sink, seen) = (Cued::default(), Seen::default());
        let queue = queue(4, &sink, &seen);
        sink.cues().failing_writes = usize::MAX;
        let given_up = queue.push_and_wait(
            b"lost\n".to_vec(),
            Instant::now() + Duration::from_millis(50),
        );
        assert_eq!(given_up, Err(NotWritten::TimedOut));
        sink.cues().failing_writes = 0;
        assert_eq!(queue.push_and_wait(b"later\n".to_vec(), soon()), Ok(()));
        assert_eq!(sink.text(), "later\n");
    }

    #[test]
    fn with_the_sink_stalled_housekeeping_is_dropped_and_lifecycle_queued() {
        let (sink, seen) = (Cued::default(), Seen::default());
        let queue = queue(2, &sink, &seen);
        sink.stall(true);
        queue.push(b"a\n".to_vec(), Class::Housekeeping);
        wait_for("the writer took the line", || queue.lock().writing);
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
        let first = thread::spawn(move || queue.push_and_wait(b"first\n".to_vec(), soon()));
        let second = thread::spawn(move || queue.push_and_wait(b"second\n".to_vec(), soon()));
        wait_for("lines queued", || queue.lock().queued == 2);
        assert_eq!(queue.flush(Duration::from_millis(50)), 2);
        queue.stop_waiting();
        // The one blocked inside the sink stays there; the other returns.
        wait_for("nobody released", || {
            first.is_finished() || second.is_finished()
        });
        sink.stall(false);
        let results = [first.join().unwrap(), second.join().unwrap()];
        assert!(results.contains(&Err(NotWritten::Abandoned)), "{results:?}");
    }
}
