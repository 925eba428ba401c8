//! A test-side check of the Prometheus text exposition format (0.0.4), so
//! that a test can assert both that a scrape is well formed and what its
//! numbers are, without trusting the encoder that wrote it.
//!
//! [`check`] enforces what Prometheus and `promtool check metrics` require
//! or recommend: every sample's family has one `# HELP` and one `# TYPE`
//! before it and its samples are together, names are valid, counters end in
//! `_total`, histogram buckets have ascending `le` bounds and cumulative
//! counts ending in a `+Inf` bucket equal to `_count`, with a `_sum`.
//! [`promtool_check`] runs the reference linter itself.
//!
//! Self-contained (std only), so that integration tests can `mod
//! prometheus_format;` it and `src/metrics.rs`'s unit tests can include it
//! by path.

#![allow(dead_code)] // each user needs its own part

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::process::{Command, Stdio};

/// A sample's labels, sorted by label name.
pub type Labels = Vec<(String, String)>;
/// One sample's identity: its name and its labels.
pub type SampleKey = (String, Labels);

/// A checked exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Every sample's value.
    pub samples: BTreeMap<SampleKey, f64>,
    /// Each family's type: `counter`, `gauge`, `histogram`, ...
    pub types: HashMap<String, String>,
}

impl Exposition {
    /// The value of the sample `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&key(name, labels)).copied()
    }

    /// The values of every sample named `name`, whatever its labels.
    pub fn values(&self, name: &str) -> Vec<(&[(String, String)], f64)> {
        self.samples
            .iter()
            .filter(|((sample, _), _)| sample == name)
            .map(|((_, labels), &value)| (labels.as_slice(), value))
            .collect()
    }
}

fn key(name: &str, labels: &[(&str, &str)]) -> SampleKey {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    (name.to_string(), labels)
}

/// Checks `text` and returns its samples, or the first problem found with
/// its line number.
pub fn check(text: &str) -> Result<Exposition, String> {
    let mut exposition = Exposition::default();
    let mut helped = HashSet::new();
    // Families whose samples are finished (another family came after).
    let mut closed: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut order = Vec::new();
    // The last `le` written for each bucket series (labels without `le`).
    let mut last_le = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let at = |why: String| format!("line {}: {why}: {line:?}", index + 1);
        if line.trim().is_empty() {
            continue;
        }
        let family = if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            check_escapes(help, false).map_err(at)?;
            if !helped.insert(name.to_string()) {
                return Err(at(format!("second HELP for {name}")));
            }
            name.to_string()
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let Some((name, kind)) = rest.split_once(' ') else {
                return Err(at("TYPE without a type".to_string()));
            };
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at(format!("unknown type {kind}")));
            }
            if exposition.types.contains_key(name) {
                return Err(at(format!("second TYPE for {name}")));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(at(format!("counter {name} does not end in _total")));
            }
            exposition.types.insert(name.to_string(), kind.to_string());
            name.to_string()
        } else if line.starts_with('#') {
            continue;
        } else {
            let (name, labels, value) = parse_sample(line).map_err(at)?;
            let family = family_of(&name, &exposition.types)
                .ok_or_else(|| at(format!("sample {name} before its HELP and TYPE")))?;
            if !helped.contains(&family) {
                return Err(at(format!("sample {name} before its HELP")));
            }
            if exposition.types[&family] == "counter" && (value.is_nan() || value < 0.0) {
                return Err(at(format!("counter {name} is {value}")));
            }
            if exposition.types[&family] == "histogram" && name.ends_with("_bucket") {
                check_le_written_in_order(&name, &labels, &mut last_le).map_err(at)?;
            }
            let sample_key = (name, labels);
            if exposition.samples.insert(sample_key, value).is_some() {
                return Err(at("the same sample twice".to_string()));
            }
            family
        };
        if !is_metric_name(&family) {
            return Err(at(format!("bad metric name {family:?}")));
        }
        if current.as_ref() != Some(&family) {
            if closed.contains(&family) {
                return Err(at(format!("the lines of {family} are not together")));
            }
            if let Some(previous) = current.replace(family.clone()) {
                closed.insert(previous);
            }
            order.push(family);
        }
    }
    for family in &order {
        if !helped.contains(family) || !exposition.types.contains_key(family) {
            return Err(format!("{family} lacks a HELP or a TYPE line"));
        }
        if exposition.types[family] == "histogram" {
            check_histogram(family, &exposition)?;
        }
    }
    Ok(exposition)
}

/// The family a sample belongs to: its own name, or for histograms and
/// summaries the name without `_bucket`, `_sum` or `_count`.
fn family_of(name: &str, types: &HashMap<String, String>) -> Option<String> {
    if types.contains_key(name) {
        return Some(name.to_string());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        let kind = types.get(base)?;
        let fits = kind == "histogram" || (kind == "summary" && *suffix != "_bucket");
        fits.then(|| base.to_string())
    })
}

/// Each label set of histogram `family`: `le` ascending, ending in `+Inf`,
/// counts cumulative, `+Inf` equal to `_count`, `_sum` present.
fn check_histogram(family: &str, exposition: &Exposition) -> Result<(), String> {
    let bucket_name = format!("{family}_bucket");
    let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
    // Samples are sorted by key, not by text order: collect, then sort by le.
    for ((name, labels), &value) in &exposition.samples {
        if *name != bucket_name {
            continue;
        }
        let Some((_, le)) = labels.iter().find(|(label, _)| label == "le") else {
            return Err(format!("{bucket_name} without le"));
        };
        let le = parse_value(le).map_err(|e| format!("{bucket_name}: le {e}"))?;
        let rest = labels.iter().filter(|(l, _)| l != "le").cloned().collect();
        series.entry(rest).or_default().push((le, value));
    }
    if series.is_empty() {
        return Err(format!("histogram {family} has no buckets"));
    }
    for (labels, buckets) in &series {
        let borrowed: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let count = exposition
            .value(&format!("{family}_count"), &borrowed)
            .ok_or_else(|| format!("{family} {labels:?} has no _count"))?;
        exposition
            .value(&format!("{family}_sum"), &borrowed)
            .ok_or_else(|| format!("{family} {labels:?} has no _sum"))?;
        let mut by_le = buckets.clone();
        by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
        if by_le.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(format!("{family}: le bounds are not strictly ascending"));
        }
        if by_le.windows(2).any(|w| w[1].1 < w[0].1) {
            return Err(format!("{family}: bucket counts decrease: {by_le:?}"));
        }
        match by_le.last() {
            Some(&(le, inf)) if le == f64::INFINITY => {
                if inf != count {
                    return Err(format!("{family}: +Inf bucket {inf} != _count {count}"));
                }
            }
            _ => return Err(format!("{family} has no +Inf bucket")),
        }
    }
    Ok(())
}

/// Buckets must be written with `le` ascending (the map in [`Exposition`]
/// keeps no order, so this is checked as the lines come).
fn check_le_written_in_order(
    name: &str,
    labels: &Labels,
    last_le: &mut HashMap<SampleKey, f64>,
) -> Result<(), String> {
    let Some((_, le)) = labels.iter().find(|(label, _)| label == "le") else {
        return Err(format!("{name} without le"));
    };
    let le = parse_value(le).map_err(|e| format!("le: {e}"))?;
    let rest = labels.iter().filter(|(l, _)| l != "le").cloned().collect();
    if let Some(previous) = last_le.insert((name.to_string(), rest), le)
        && (le.is_nan() || le <= previous)
    {
        return Err(format!("{name}: le {le} after {previous}, not ascending"));
    }
    Ok(())
}

/// `name{label="value",...} value [timestamp]`
fn parse_sample(line: &str) -> Result<(String, Labels, f64), String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample without a value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = after_brace;
        loop {
            rest = rest.trim_start_matches(',');
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after) = rest.split_once("=\"").ok_or("a label without =\"")?;
            if !is_label_name(label) {
                return Err(format!("bad label name {label:?}"));
            }
            let (value, after) = take_label_value(after)?;
            if labels.iter().any(|(l, _)| l == label) {
                return Err(format!("label {label} twice"));
            }
            labels.push((label.to_string(), value));
            rest = after;
            if !rest.starts_with(',') && !rest.starts_with('}') {
                return Err("labels not separated by commas".to_string());
            }
        }
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("a sample without a value")?;
    let value = parse_value(value)?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("bad timestamp {timestamp:?}"))?;
    }
    if fields.next().is_some() {
        return Err("text after the timestamp".to_string());
    }
    labels.sort();
    Ok((name.to_string(), labels, value))
}

/// A quoted label value up to its closing quote, unescaped, and what follows.
fn take_label_value(text: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => value.push('\\'),
                Some((_, '"')) => value.push('"'),
                Some((_, 'n')) => value.push('\n'),
                other => return Err(format!("bad escape \\{:?} in a label value", other)),
            },
            '\n' => return Err("a raw newline in a label value".to_string()),
            c => value.push(c),
        }
    }
    Err("an unterminated label value".to_string())
}

/// HELP text may contain only the `\\` and `\n` escapes.
fn check_escapes(text: &str, quote: bool) -> Result<(), String> {
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('\\' | 'n') => {}
                Some('"') if quote => {}
                other => return Err(format!("bad escape \\{other:?} in HELP")),
            }
        }
    }
    Ok(())
}

/// A value as Go's `ParseFloat` reads it, with Prometheus's spellings of
/// infinity and NaN.
fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if text
            .chars()
            .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E') =>
        {
            Err(format!("bad value {text:?}"))
        }
        _ => text.parse().map_err(|_| format!("bad value {text:?}")),
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
pub fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with the reserved `__`.
pub fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `promtool` is on the PATH (Debian: `apt-get install prometheus`).
pub fn promtool_installed() -> bool {
    Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// `promtool check metrics < text`: `Err` with its output if it finds any
/// problem (it exits 1 for lint warnings too, such as a counter without
/// `_total`), or if it cannot be run.
pub fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("promtool has no stdin")?;
    // The text is small; promtool reads all of it before writing anything.
    stdin
        .write_all(text.as_bytes())
        .map_err(|e| format!("cannot write to promtool: {e}"))?;
    drop(stdin);
    let output = child
        .wait_with_output()
        .map_err(|e| format!("promtool did not finish: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "promtool check metrics failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// `GET /metrics` from a server's metrics endpoint at `addr`: the status
/// line, the headers (lower-cased names) and the body.
pub fn scrape(addr: std::net::SocketAddr, path: &str) -> (String, Vec<(String, String)>, String) {
    use std::io::Read;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(20))
            .expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("read timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the whole response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {response:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}
