//! The bounded queue between log calls and the log sink (stderr), and the
//! one writer that empties it.
//!
//! A log sink can stall (a full pipe, a stuck journald). Writing to it
//! directly would freeze whoever logs, the accept loop and the signal
//! thread included. So formatted lines go into a queue of at most
//! `capacity` waiting lines, and what a caller may do when it is full
//! depends on the line's [`Class`]:
//!
//! - a [`Class::Reply`] line (a client's reply, the outcome of a served
//!   connection) waits for room, and then until it has been written: a
//!   connection is closed only once its reply is in the sink, so a client
//!   that sees a clean close can trust its reply was logged. With the sink
//!   stalled, connection threads wait here, slots fill, and new clients
//!   get the busy line: the server degrades to "busy", it does not hang;
//! - a [`Class::Lifecycle`] line (listening, signals, shutdown, summary)
//!   is queued at once, even past the bound: there are only a handful;
//! - a [`Class::Housekeeping`] line (busy, denied, accept errors, debug)
//!   is dropped and counted when the queue is full; one line reports the
//!   count once the sink takes writes again.
//!
//! Whoever waits for its line to be written and finds nobody writing
//! writes the queue itself, so an idle server's reply costs one `write` on
//! the connection's own thread; lines of callers that never wait are
//! written by the writer thread.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

/// What a log line is, which decides what happens to it when the queue is
/// full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Carries client data: never dropped; its caller waits until written.
    Reply,
    /// About the server's life: never dropped, never waits.
    Lifecycle,
    /// About turned-away clients, errors, debugging: dropped when full.
    Housekeeping,
}

/// Whether a line reached the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Written to the sink (or, for callers that do not wait, queued).
    Written,
    /// Queued, but the sink had not taken it when the server stopped
    /// waiting for it.
    Unwritten,
    /// Dropped because the queue was full.
    Dropped,
}

/// The writer thread only moves bytes: a small fixed stack.
const WRITER_THREAD_STACK: usize = 256 * 1024;

/// A bounded queue of formatted lines in front of one sink.
pub(crate) struct LogSink<W> {
    capacity: usize,
    state: Mutex<State>,
    /// Signalled when a writer takes the waiting lines (there is room).
    room: Condvar,
    /// Signalled when a batch has been written (or callers stop waiting).
    written: Condvar,
    /// Signalled for the writer thread: lines to write, or a batch done.
    work: Condvar,
    /// The sink itself; only the thread holding the writer role uses it.
    sink: Mutex<W>,
}

struct State {
    /// Lines queued and not yet taken by a writer.
    waiting: VecDeque<Vec<u8>>,
    /// Lines ever queued; a line's number is the count after it was queued.
    queued: u64,
    /// Lines whose write has finished, in queue order.
    written: u64,
    /// A thread is writing a batch taken from `waiting`.
    writing: bool,
    /// Housekeeping lines dropped since the last report.
    dropped: u64,
    /// Housekeeping lines dropped ever, for the metrics.
    dropped_total: u64,
    /// Set by a stopping server: nobody waits for the sink any more.
    abandoned: bool,
}

impl<W: Write> LogSink<W> {
    /// A queue of at most `capacity` waiting lines (at least one) in front
    /// of `sink`.
    pub(crate) fn new(capacity: usize, sink: W) -> Self {
        LogSink {
            capacity: capacity.max(1),
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                queued: 0,
                written: 0,
                writing: false,
                dropped: 0,
                dropped_total: 0,
                abandoned: false,
            }),
            room: Condvar::new(),
            written: Condvar::new(),
            work: Condvar::new(),
            sink: Mutex::new(sink),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a housekeeping line would be dropped now; lets a caller skip
    /// formatting it.
    pub(crate) fn would_drop(&self, class: Class) -> bool {
        class == Class::Housekeeping && self.lock().waiting.len() >= self.capacity
    }

    /// Counts a housekeeping line that was not even formatted.
    pub(crate) fn count_dropped(&self) {
        let mut state = self.lock();
        state.dropped += 1;
        state.dropped_total += 1;
    }

    /// Housekeeping lines dropped since the sink was made.
    pub(crate) fn dropped_total(&self) -> u64 {
        self.lock().dropped_total
    }

    /// Queues `line` as its class says, and for a reply line waits until
    /// it is written (writing the queue itself if nobody else is).
    pub(crate) fn push(&self, line: Vec<u8>, class: Class) -> Delivery {
        let mut state = self.lock();
        match class {
            Class::Housekeeping if state.waiting.len() >= self.capacity => {
                state.dropped += 1;
                state.dropped_total += 1;
                return Delivery::Dropped;
            }
            Class::Reply => {
                state = self
                    .room
                    .wait_while(state, |s| s.waiting.len() >= self.capacity && !s.abandoned)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            Class::Housekeeping | Class::Lifecycle => {}
        }
        state.waiting.push_back(line);
        state.queued += 1;
        let number = state.queued;
        if class != Class::Reply {
            drop(state);
            self.work.notify_one();
            return Delivery::Written;
        }
        loop {
            if state.written >= number {
                return Delivery::Written;
            }
            if state.abandoned {
                return Delivery::Unwritten;
            }
            state = if state.writing {
                self.written
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner)
            } else {
                self.write_batch(state)
            };
        }
    }

    /// Takes the writer role and writes every waiting line in one go;
    /// returns with the lock held again.
    fn write_batch<'a>(&'a self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        state.writing = true;
        let was_full = state.waiting.len() >= self.capacity;
        let batch: Vec<Vec<u8>> = state.waiting.drain(..).collect();
        drop(state);
        if was_full {
            self.room.notify_all();
        }
        {
            let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
            // A sink that fails (closed stderr) cannot be helped: the line
            // counts as handled, or every caller would wait forever.
            let _ = match batch.as_slice() {
                [line] => sink.write_all(line),
                lines => sink.write_all(&lines.concat()),
            }
            .and_then(|()| sink.flush());
        }
        let mut state = self.lock();
        state.written += batch.len() as u64;
        state.writing = false;
        self.written.notify_all();
        self.work.notify_one();
        state
    }

    /// The writer thread's loop: writes lines of callers that do not wait,
    /// and reports dropped lines once the sink takes writes again.
    /// `report` formats that report as a log line (it is logged through
    /// the same queue).
    fn serve(&self, report: impl Fn(u64)) {
        let mut state = self.lock();
        loop {
            state = self
                .work
                .wait_while(state, |s| {
                    s.writing || (s.waiting.is_empty() && s.dropped == 0)
                })
                .unwrap_or_else(PoisonError::into_inner);
            if !state.waiting.is_empty() {
                state = self.write_batch(state);
            }
            // Lines are dropped only while the queue is full; once there is
            // room again, a write has gone through: the sink is back.
            if !state.writing && state.dropped > 0 && state.waiting.len() < self.capacity {
                let dropped = std::mem::take(&mut state.dropped);
                drop(state);
                report(dropped);
                state = self.lock();
            }
        }
    }

    /// Waits up to `timeout` for every queued line to be written; returns
    /// how many were not.
    pub(crate) fn flush(&self, timeout: Duration) -> u64 {
        let state = self
            .written
            .wait_timeout_while(self.lock(), timeout, |s| s.written < s.queued)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        state.queued - state.written
    }

    /// Makes reply lines stop waiting to be written, now and from now on:
    /// they are still queued, but their callers learn they are not written.
    pub(crate) fn stop_waiting(&self) {
        self.lock().abandoned = true;
        self.room.notify_all();
        self.written.notify_all();
    }
}

impl<W: Write + Send + 'static> LogSink<W> {
    /// Starts the writer thread for a queue that lives as long as the
    /// process.
    pub(crate) fn start_writer(
        sink: &'static LogSink<W>,
        report: impl Fn(u64) + Send + 'static,
    ) -> io::Result<()> {
        thread::Builder::new()
            .name("log-writer".to_string())
            .stack_size(WRITER_THREAD_STACK)
            .spawn(move || sink.serve(report))
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    const LONG: Duration = Duration::from_secs(20);

    /// A sink that blocks every write while `stalled` is set.
    #[derive(Clone, Default)]
    struct Stallable {
        stalled: Arc<AtomicBool>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stallable {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            while self.stalled.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
            }
            self.written.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn leak<W: Write>(sink: LogSink<W>) -> &'static LogSink<W> {
        Box::leak(Box::new(sink))
    }

    #[test]
    fn a_reply_line_is_written_before_push_returns() {
        let out = Stallable::default();
        let sink = LogSink::new(4, out.clone());
        assert_eq!(
            sink.push(b"one\n".to_vec(), Class::Reply),
            Delivery::Written
        );
        assert_eq!(&*out.written.lock().unwrap(), b"one\n");
    }

    #[test]
    fn with_the_sink_stalled_housekeeping_is_dropped_and_lifecycle_queued() {
        let out = Stallable::default();
        out.stalled.store(true, Ordering::SeqCst);
        let sink = leak(LogSink::new(2, out.clone()));
        let reports = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&reports);
        LogSink::start_writer(sink, move |n| seen.lock().unwrap().push(n)).unwrap();
        // The writer takes the first line and blocks in the sink; two more
        // fill the queue.
        assert_eq!(
            sink.push(b"a\n".to_vec(), Class::Housekeeping),
            Delivery::Written
        );
        let taken_by = Instant::now() + LONG;
        while !sink.lock().writing {
            assert!(Instant::now() < taken_by, "the writer never took the line");
            thread::yield_now();
        }
        for line in ["b\n", "c\n"] {
            assert_eq!(
                sink.push(line.into(), Class::Housekeeping),
                Delivery::Written
            );
        }
        assert!(sink.would_drop(Class::Housekeeping));
        assert_eq!(
            sink.push(b"busy\n".to_vec(), Class::Housekeeping),
            Delivery::Dropped
        );
        assert_eq!(
            sink.push(b"stopping\n".to_vec(), Class::Lifecycle),
            Delivery::Written
        );
        out.stalled.store(false, Ordering::SeqCst);
        assert_eq!(sink.flush(LONG), 0);
        assert_eq!(&*out.written.lock().unwrap(), b"a\nb\nc\nstopping\n");
        let reported_by = Instant::now() + LONG;
        while reports.lock().unwrap().is_empty() {
            assert!(Instant::now() < reported_by, "no drop report");
            thread::yield_now();
        }
        assert_eq!(*reports.lock().unwrap(), vec![1]);
    }

    #[test]
    fn reply_lines_wait_while_stalled_and_are_all_written_in_order() {
        let out = Stallable::default();
        out.stalled.store(true, Ordering::SeqCst);
        let sink = leak(LogSink::new(2, out.clone()));
        let writers: Vec<_> = (0..8)
            .map(|i| thread::spawn(move || sink.push(format!("{i}\n").into(), Class::Reply)))
            .collect();
        let stalled_at = Instant::now() + LONG;
        while sink.lock().waiting.len() < 2 {
            assert!(Instant::now() < stalled_at, "queue never filled");
            thread::yield_now();
        }
        assert!(writers.iter().all(|w| !w.is_finished()));
        out.stalled.store(false, Ordering::SeqCst);
        for writer in writers {
            assert_eq!(writer.join().unwrap(), Delivery::Written);
        }
        let mut lines: Vec<String> = String::from_utf8(out.written.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        lines.sort();
        assert_eq!(lines, (0..8).map(|i| i.to_string()).collect::<Vec<_>>());
    }

    #[test]
    fn abandoning_a_stalled_queue_releases_waiting_reply_lines() {
        let out = Stallable::default();
        out.stalled.store(true, Ordering::SeqCst);
        let sink = leak(LogSink::new(1, out.clone()));
        let first = thread::spawn(move || sink.push(b"first\n".to_vec(), Class::Reply));
        let second = thread::spawn(move || sink.push(b"second\n".to_vec(), Class::Reply));
        let queued_at = Instant::now() + LONG;
        while sink.lock().queued < 2 {
            assert!(Instant::now() < queued_at, "lines never queued");
            thread::yield_now();
        }
        assert_eq!(sink.flush(Duration::from_millis(50)), 2);
        sink.stop_waiting();
        // The one blocked inside the sink stays there; the other returns.
        let released = [&first, &second].iter().filter(|t| t.is_finished()).count();
        let deadline = Instant::now() + LONG;
        let mut released = released;
        while released == 0 {
            assert!(Instant::now() < deadline, "nobody released");
            thread::yield_now();
            released = [&first, &second].iter().filter(|t| t.is_finished()).count();
        }
        out.stalled.store(false, Ordering::SeqCst);
        let results = [first.join().unwrap(), second.join().unwrap()];
        assert!(results.contains(&Delivery::Unwritten), "{results:?}");
    }
}
