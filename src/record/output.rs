//! Where the log's bytes go: stderr, or the `--log-file`, which SIGHUP
//! reopens (logrotate's `create` mode), and which is synced after every
//! batch that holds a record, so that a record is on disk before its
//! client is told it is kept.
//!
//! stderr is synced too when it is a regular file (`2>server.log`): a
//! record there is just as much data. A pipe, a terminal or journald's
//! socket cannot be synced and is not.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender};
use std::thread;

/// A file, or, in the queue's tests, a writer that fails on cue.
pub(crate) trait Sink: Write + Send {
    fn sync_data(&mut self) -> io::Result<()>;
}

impl Sink for File {
    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// The log's destination, written by one thread at a time (the queue's
/// writer role).
pub(crate) struct Output {
    file: Box<dyn Sink>,
    /// `None`: stderr.
    path: Option<PathBuf>,
    /// `fdatasync` after each batch that holds a record.
    sync: bool,
}

impl Output {
    /// A duplicate of descriptor 2.
    pub(crate) fn stderr(sync: bool) -> io::Result<Output> {
        let file = File::from(io::stderr().as_fd().try_clone_to_owned()?);
        let regular = file.metadata().is_ok_and(|meta| meta.is_file());
        Ok(Output::to_sink(file, None, sync && regular))
    }

    pub(crate) fn file(path: &Path, sync: bool) -> io::Result<Output> {
        let file = open_log_file(path)?;
        Ok(Output::to_sink(file, Some(path.to_path_buf()), sync))
    }

    pub(crate) fn to_sink(sink: impl Sink + 'static, path: Option<PathBuf>, sync: bool) -> Output {
        Output {
            file: Box::new(sink),
            path,
            sync,
        }
    }

    /// stderr opened again, non-blocking, when it is a pipe and not synced:
    /// a new open file description of the same pipe, so that its
    /// `O_NONBLOCK` is ours alone (descriptor 2's is shared with whoever
    /// started the server).
    pub(crate) fn unsynced_pipe(&self) -> Option<File> {
        let pipe = self.path.is_none()
            && !self.sync
            && fs::metadata("/proc/self/fd/2").is_ok_and(|meta| meta.file_type().is_fifo());
        let open = || {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("/proc/self/fd/2")
        };
        pipe.then(open)?.ok()
    }

    /// One `write`: how many bytes of `bytes` it took.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.file.write(bytes)
    }

    /// `fdatasync`, if this output is synced.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        if self.sync {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }

    /// Opens the log file's path again (after logrotate renamed it) and
    /// writes `first_line` there first; the old file is kept on failure.
    /// stderr has nothing to reopen.
    pub(crate) fn reopen(&mut self, first_line: &[u8]) -> io::Result<()> {
        if let Some(path) = &self.path {
            let mut file = open_log_file(path)?;
            file.write_all(first_line)?;
            self.file = Box::new(file);
        }
        Ok(())
    }
}

/// Appended to (so that a writer never leaves holes), created if missing,
/// readable by its owner and group only: it holds what clients sent. A
/// file whose last line a failing disk left torn gets its newline first, so
/// that the next line starts a line of its own.
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

/// The `kind` label of the log's write errors, by errno.
pub(super) const ERROR_KINDS: [(&str, Option<i32>); 6] = [
    ("ENOSPC", Some(libc::ENOSPC)),
    ("EDQUOT", Some(libc::EDQUOT)),
    ("EFBIG", Some(libc::EFBIG)),
    ("EIO", Some(libc::EIO)),
    ("EPIPE", Some(libc::EPIPE)),
    ("other", None),
];

/// Starts a thread that writes the lines it is sent to stderr, so that a
/// stalled stderr never holds up the log file.
pub(super) fn stderr_writer() -> io::Result<SyncSender<String>> {
    let (send, receive) = mpsc::sync_channel::<String>(16);
    thread::Builder::new()
        .name("log-reports".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            for line in receive {
                let _ = io::stderr().write_all(line.as_bytes());
            }
        })?;
    Ok(send)
}

/// Which of [`ERROR_KINDS`] `error` is.
pub(super) fn error_kind(error: &io::Error) -> usize {
    ERROR_KINDS
        .iter()
        .position(|(_, errno)| errno.is_some() && *errno == error.raw_os_error())
        .unwrap_or(ERROR_KINDS.len() - 1)
}
