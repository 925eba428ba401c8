//! The test-side Prometheus format check (`tests/prometheus_format`) against
//! `promtool check metrics`, the reference linter: both must accept a
//! well-formed exposition and both must reject the same broken ones, so that
//! tests which only have the checker (promtool is optional) can trust it.
//!
//! The scrape of a running server joins this file once `--metrics-addr` is
//! wired in; the encoder's own output is checked by the unit tests in
//! `src/metrics.rs`.
//!
//! Needs `promtool` (Debian package `prometheus`) for the comparison; without
//! it only the checker's half runs, after one `SKIPPED` line, unless
//! `PROMPT_SERVER_REQUIRE_PROMTOOL=1` or `PROMPT_SERVER_REQUIRE_ALL=1`.

mod common;
mod prometheus_format;

use common::require_program;

/// What the official Go client writes for a counter family with labels, a
/// gauge and a histogram.
const GOOD: &str = "\
# HELP http_requests_total Requests by code.
# TYPE http_requests_total counter
http_requests_total{code=\"200\",path=\"/a \\\"b\\\"\\\\c\\nd\"} 1027
http_requests_total{code=\"400\",path=\"/\"} 3
# HELP temperature_celsius Room temperature,\\nin Celsius.
# TYPE temperature_celsius gauge
temperature_celsius -3.5
# HELP latency_seconds Request latency.
# TYPE latency_seconds histogram
latency_seconds_bucket{le=\"0.005\"} 1
latency_seconds_bucket{le=\"0.5\"} 4
latency_seconds_bucket{le=\"+Inf\"} 5
latency_seconds_sum 7.25
latency_seconds_count 5
";

/// Broken expositions both must refuse.
const BAD: &[&str] = &[
    // A counter without `_total`.
    "# HELP requests Requests.\n# TYPE requests counter\nrequests 1\n",
    // No HELP.
    "# TYPE up gauge\nup 1\n",
    // A bad metric name.
    "# HELP 9lives Lives.\n# TYPE 9lives gauge\n9lives 9\n",
];

#[test]
fn the_checker_reads_a_good_exposition() {
    let exposition = prometheus_format::check(GOOD).unwrap_or_else(|e| panic!("{e}"));
    let path = "/a \"b\"\\c\nd";
    assert_eq!(
        exposition.value("http_requests_total", &[("path", path), ("code", "200")]),
        Some(1027.0)
    );
    assert_eq!(exposition.values("http_requests_total").len(), 2);
    assert_eq!(exposition.value("temperature_celsius", &[]), Some(-3.5));
    let bucket = "latency_seconds_bucket";
    assert_eq!(exposition.value(bucket, &[("le", "+Inf")]), Some(5.0));
    assert_eq!(exposition.types["latency_seconds"], "histogram");
    for bad in BAD {
        assert!(prometheus_format::check(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn promtool_agrees_with_the_checker() {
    if !require_program("promtool", "apt-get install prometheus") {
        return;
    }
    if let Err(e) = prometheus_format::promtool_check(GOOD) {
        panic!("{e}");
    }
    for bad in BAD {
        assert!(prometheus_format::promtool_check(bad).is_err(), "{bad:?}");
    }
}
