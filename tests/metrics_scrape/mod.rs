//! Scraping the metrics endpoint from tests: one HTTP exchange over a real
//! socket, and a sample's value read out of the text (a name, labels and a
//! value per line). The format itself is `promtool check metrics`'s to judge
//! (tests/metrics.rs).

#![allow(dead_code)] // each test file uses its own part

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long one exchange may take before the test gives up on it.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(20);

/// An HTTP response: the status line, the headers (names lower-cased) and
/// the body.
#[derive(Debug)]
pub struct Response {
    pub status: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut found = self.headers.iter().filter(|(n, _)| n == name);
        found.next().map(|(_, value)| value.as_str())
    }
}

/// Sends `request` to `addr` and reads the response to the close, within
/// `timeout` for each step.
pub fn exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(request)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response =
        String::from_utf8(response).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no end of headers: {response:?}"),
        )
    })?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

/// `GET path` from the metrics endpoint at `addr`.
pub fn scrape(addr: SocketAddr, path: &str) -> Response {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    exchange(addr, request.as_bytes(), SCRAPE_TIMEOUT)
        .unwrap_or_else(|e| panic!("scrape of {addr}{path} failed: {e}"))
}

/// The value of the sample `name` with exactly these `labels` (in any
/// order) in a scrape's text.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (sample_name, labels) = match series.split_once('{') {
                Some((sample_name, labels)) => (sample_name, labels.strip_suffix('}')?),
                None => (series, ""),
            };
            let mut found: Vec<String> = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            found.sort();
            (sample_name == name && found == wanted).then(|| value.parse().ok())?
        })
}
