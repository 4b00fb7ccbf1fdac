//! The dashboard's time series: one sample a second of throughput, errors and latency, kept in
//! memory for the last ten minutes.
//!
//! Why here and not in the sessions: the numbers already exist as the Prometheus metrics every
//! session records; sampling the rendered metrics once a second costs the hot path nothing and
//! keeps one source of truth for `/metrics`, the dashboard and Grafana alike.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

/// Ten minutes of one-second samples.
pub const KEEP: usize = 600;
pub const INTERVAL: Duration = Duration::from_secs(1);

/// One second of the proxy's life, as the dashboard charts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Sample {
    pub unix: u64,
    /// Client requests completed per second.
    pub requests: f64,
    /// Requests per second that ended with an error.
    pub errors: f64,
    /// Latency quantiles of the requests of that second, in milliseconds (None: no request).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub sessions: f64,
}

/// The totals read from one rendering of the metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub requests: f64,
    pub errors: f64,
    pub sessions: f64,
    /// (upper bound in seconds, cumulative count), in the order rendered (ascending).
    pub buckets: Vec<(f64, f64)>,
}

impl Totals {
    /// Reads the few series the dashboard needs from Prometheus text.
    pub fn parse(text: &str) -> Totals {
        let mut t = Totals::default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let Ok(v) = value.parse::<f64>() else { continue };
            if name.starts_with("chorus_requests_total") {
                t.requests += v;
            } else if name.starts_with("chorus_request_errors_total") {
                t.errors += v;
            } else if name == "chorus_sessions" {
                t.sessions = v;
            } else if let Some(rest) = name.strip_prefix("chorus_request_duration_seconds_bucket{le=\"") {
                let le = rest.trim_end_matches("\"}");
                let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
                t.buckets.push((bound, v));
            }
        }
        t
    }
}

/// The `q` quantile (0..1) of the requests between two cumulative histograms, interpolated
/// within its bucket; None when no request completed in between.
pub fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta = |i: usize| after[i].1 - before.get(i).map_or(0.0, |b| b.1);
    let total = delta(after.len().checked_sub(1)?);
    if total <= 0.0 {
        return None;
    }
    let want = q * total;
    let mut lower = (0.0, 0.0);
    for (i, &(bound, _)) in after.iter().enumerate() {
        let count = delta(i);
        if count >= want {
            if !bound.is_finite() {
                return Some(lower.0); // beyond the last bound: the last bound is all we know
            }
            let within = (want - lower.1) / (count - lower.1).max(f64::MIN_POSITIVE);
            return Some(lower.0 + (bound - lower.0) * within.clamp(0.0, 1.0));
        }
        lower = (bound, count);
    }
    None
}

/// The sampled history, shared by the sampler and the admin API.
#[derive(Default)]
pub struct Series {
    samples: Mutex<VecDeque<Sample>>,
}

impl Series {
    pub fn push(&self, s: Sample) {
        let mut v = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() == KEEP {
            v.pop_front();
        }
        v.push_back(s);
    }

    /// The samples newer than `since` (unix seconds), oldest first.
    pub fn since(&self, since: u64) -> Vec<Sample> {
        let v = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        v.iter().filter(|s| s.unix > since).copied().collect()
    }
}

/// The sample for the interval between two readings `secs` apart.
pub fn sample(before: &Totals, after: &Totals, secs: f64, unix: u64) -> Sample {
    let rate = |a: f64, b: f64| ((a - b) / secs).max(0.0);
    let ms = |q| quantile(&before.buckets, &after.buckets, q).map(|s| s * 1000.0);
    Sample {
        unix,
        requests: rate(after.requests, before.requests),
        errors: rate(after.errors, before.errors),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        sessions: after.sessions,
    }
}

/// Samples the metrics every second until `stop` is cancelled.
pub async fn run(series: std::sync::Arc<Series>, metrics: PrometheusHandle, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(Totals, std::time::Instant)> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = std::time::Instant::now();
        let totals = Totals::parse(&metrics.render());
        if let Some((before, at)) = &last {
            let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            series.push(sample(before, &totals, now.duration_since(*at).as_secs_f64().max(0.001), unix));
        }
        last = Some((totals, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE chorus_requests_total counter\n\
        chorus_requests_total{fanout=\"all\"} 10\n\
        chorus_requests_total{fanout=\"one\"} 30\n\
        chorus_request_errors_total 2\n\
        chorus_sessions 4\n\
        chorus_request_duration_seconds_bucket{le=\"0.001\"} 20\n\
        chorus_request_duration_seconds_bucket{le=\"0.01\"} 38\n\
        chorus_request_duration_seconds_bucket{le=\"+Inf\"} 40\n";

    #[test]
    fn totals_and_quantiles() {
        let t = Totals::parse(TEXT);
        assert_eq!((t.requests, t.errors, t.sessions), (40.0, 2.0, 4.0));
        assert_eq!(t.buckets.len(), 3);
        let zero = Totals::default();
        // Half of 40 requests finished within 1 ms: the median is at that bound.
        assert_eq!(quantile(&zero.buckets, &t.buckets, 0.5), Some(0.001));
        // The 99th percentile lies past the last finite bound: that bound is reported.
        assert_eq!(quantile(&zero.buckets, &t.buckets, 0.99), Some(0.01));
        let s = sample(&zero, &t, 2.0, 7);
        assert_eq!((s.requests, s.errors, s.unix), (20.0, 1.0, 7));
        // Nothing happened between two equal readings.
        assert_eq!(quantile(&t.buckets, &t.buckets, 0.5), None);
        assert_eq!(sample(&t, &t, 1.0, 8).requests, 0.0);
    }

    #[test]
    fn the_history_is_bounded() {
        let s = Series::default();
        for i in 0..(KEEP as u64 + 5) {
            s.push(Sample { unix: i, ..Sample::default() });
        }
        let all = s.since(0);
        assert_eq!(all.len(), KEEP);
        assert_eq!(all.last().map(|x| x.unix), Some(KEEP as u64 + 4));
        assert_eq!(s.since(KEEP as u64 + 3).len(), 1);
    }
}
