//! The Prometheus text exposition of devices' counters.
//!
//! Every series of a device has the labels `device` (the ublk id) and `image` (the image id);
//! per-origin byte counts add `origin` (`scheme://host[:port]`) and `mirror` (`true`, `false`).
//! The values are the chunk store's own counters ([`StatsSnapshot`], as `lazyblk status` shows
//! them), read at scrape time and written by `prometheus-client` (`Collector` with constant
//! metrics: the counters live in the store, this only reports them). The latency histogram's
//! buckets are the store's fixed buckets, also reported as they are (a custom
//! [`EncodeMetric`], since `prometheus-client`'s own `Histogram` only counts observations
//! made through it).
//!
//! With `host`, [`encode`] adds `lazyblk_host_*` families without device labels: the sum over
//! the live devices of each counter and gauge, the histogram and per-origin bytes, and
//! `lazyblk_host_devices{state="up"|"down"}`. A device whose daemon does not answer is only
//! `lazyblk_up{device,image} 0`.

use lazyblk_chunkstore::{HistogramSnapshot, OriginBytes, StatsSnapshot};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashSet;

use crate::{Error, Result};

/// One device as the exposition sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// The ublk device id.
    pub id: u32,
    /// The image id (`sha256:...`).
    pub image: String,
    /// Its counters, `None` when its daemon did not answer (the device is down).
    pub stats: Option<StatsSnapshot>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
    image: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OriginLabels {
    device: String,
    image: String,
    origin: String,
    mirror: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostOriginLabels {
    origin: String,
    mirror: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// One counter or gauge per device: its name without the unit and `_total` (added by the
/// encoder), help, unit, type, and where its value is in a snapshot.
struct Scalar {
    name: &'static str,
    help: &'static str,
    bytes: bool,
    kind: MetricType,
    get: fn(&StatsSnapshot) -> u64,
}

const fn counter(name: &'static str, help: &'static str, get: fn(&StatsSnapshot) -> u64) -> Scalar {
    Scalar {
        name,
        help,
        bytes: false,
        kind: MetricType::Counter,
        get,
    }
}

const fn bytes(mut s: Scalar) -> Scalar {
    s.bytes = true;
    s
}

const fn gauge(name: &'static str, help: &'static str, get: fn(&StatsSnapshot) -> u64) -> Scalar {
    Scalar {
        name,
        help,
        bytes: false,
        kind: MetricType::Gauge,
        get,
    }
}

const SCALARS: &[Scalar] = &[
    counter(
        "hits",
        "Reads served from the cache without waiting for a fetch",
        |s| s.hits,
    ),
    counter("misses", "Reads that waited for a fetch", |s| s.misses),
    counter(
        "requests",
        "Range requests sent to the remote, retries included",
        |s| s.requests,
    ),
    counter(
        "retries",
        "Range requests retried after a transient failure or bytes that did not verify",
        |s| s.retries,
    ),
    bytes(counter(
        "fetched",
        "Bytes (compressed) received from the remote by range requests",
        |s| s.bytes_fetched,
    )),
    counter("chunks_fetched", "Chunks fetched and verified", |s| {
        s.chunks_fetched
    }),
    counter(
        "verify_failures",
        "Fetched chunks whose bytes did not match the manifest's digest",
        |s| s.verify_failures,
    ),
    counter("failed_ios", "Reads failed back to the frontend", |s| {
        s.failed_ios
    }),
    counter(
        "evictions",
        "Chunks evicted to stay under the cache limit",
        |s| s.evicted_chunks,
    ),
    counter(
        "cache_root_limit_evictions",
        "Chunks evicted to keep the cache root under the host cache limit",
        |s| s.host_evicted_chunks,
    ),
    counter(
        "background_chunks",
        "Chunks fetched by prefetch or hydration",
        |s| s.background_chunks,
    ),
    counter(
        "local_copies",
        "Chunks copied from another image's cache on this host instead of fetched",
        |s| s.local_copies,
    ),
    bytes(counter(
        "local_copy",
        "Bytes copied from other images' caches on this host",
        |s| s.local_copy_bytes,
    )),
    counter(
        "local_copy_stale",
        "Local copies that did not verify and were fetched instead",
        |s| s.local_copy_stale,
    ),
    counter(
        "local_reflinks",
        "Local copies that share the other cache's extents (reflinks)",
        |s| s.local_reflinks,
    ),
    bytes(gauge(
        "cache",
        "Bytes of fetched chunks held in the cache",
        |s| s.cached_bytes,
    )),
    bytes(gauge("cache_limit", "The cache limit (0: none)", |s| {
        s.cache_limit
    })),
    gauge(
        "present_chunks",
        "Chunks present in the cache (all-zero chunks included)",
        |s| s.present_chunks,
    ),
    gauge("chunks", "Chunks in the image", |s| s.total_chunks),
];

/// The store's histogram, reported as it is.
#[derive(Debug)]
struct ConstHistogram {
    sum: f64,
    count: u64,
    /// (upper bound in seconds, count in that bucket alone); the encoder accumulates.
    buckets: Vec<(f64, u64)>,
}

impl ConstHistogram {
    fn of(h: &HistogramSnapshot) -> ConstHistogram {
        let mut buckets: Vec<(f64, u64)> = h
            .bounds_us
            .iter()
            .zip(&h.counts)
            .map(|(&b, &c)| (b as f64 / 1e6, c))
            .collect();
        if h.counts.len() == h.bounds_us.len() + 1 {
            buckets.push((f64::INFINITY, h.counts[h.bounds_us.len()]));
        }
        ConstHistogram {
            sum: h.sum_us as f64 / 1e6,
            count: h.count,
            buckets,
        }
    }
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The sum of histograms with the same bounds (the store's fixed ones); others are left out.
fn sum_histograms<'a>(hs: impl Iterator<Item = &'a HistogramSnapshot>) -> HistogramSnapshot {
    let mut out: Option<HistogramSnapshot> = None;
    for h in hs {
        match &mut out {
            None => out = Some(h.clone()),
            Some(o) if o.bounds_us == h.bounds_us && o.counts.len() == h.counts.len() => {
                for (a, b) in o.counts.iter_mut().zip(&h.counts) {
                    *a += b;
                }
                o.sum_us += h.sum_us;
                o.count += h.count;
            }
            Some(_) => {}
        }
    }
    out.unwrap_or_default()
}

fn sum_origins<'a>(all: impl Iterator<Item = &'a OriginBytes>) -> Vec<OriginBytes> {
    let mut v: Vec<OriginBytes> = Vec::new();
    for o in all {
        match v
            .iter_mut()
            .find(|x| x.origin == o.origin && x.mirror == o.mirror)
        {
            Some(x) => x.bytes += o.bytes,
            None => v.push(o.clone()),
        }
    }
    v
}

#[derive(Debug)]
struct Exposition {
    devices: Vec<Device>,
    host: bool,
}

impl Exposition {
    fn live(&self) -> impl Iterator<Item = (DeviceLabels, &StatsSnapshot)> {
        self.devices.iter().filter_map(|d| {
            d.stats.as_ref().map(|s| {
                (
                    DeviceLabels {
                        device: d.id.to_string(),
                        image: d.image.clone(),
                    },
                    s,
                )
            })
        })
    }
}

fn put(m: MetricEncoder, kind: MetricType, v: u64) -> std::fmt::Result {
    match kind {
        MetricType::Counter => ConstCounter::new(v).encode(m),
        _ => ConstGauge::new(v).encode(m),
    }
}

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        {
            let mut m = enc.encode_descriptor(
                "lazyblk_up",
                "Whether the device's daemon answered (1) or not (0)",
                None,
                MetricType::Gauge,
            )?;
            for d in &self.devices {
                let l = DeviceLabels {
                    device: d.id.to_string(),
                    image: d.image.clone(),
                };
                ConstGauge::new(u64::from(d.stats.is_some())).encode(m.encode_family(&l)?)?;
            }
        }
        for s in SCALARS {
            let name = format!("lazyblk_{}", s.name);
            let unit = s.bytes.then_some(Unit::Bytes);
            let mut m = enc.encode_descriptor(&name, s.help, unit.as_ref(), s.kind)?;
            for (l, st) in self.live() {
                put(m.encode_family(&l)?, s.kind, (s.get)(st))?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "lazyblk_origin_fetched",
                "Bytes received by range requests from each origin (scheme://host[:port]) and mirror",
                Some(&Unit::Bytes),
                MetricType::Counter,
            )?;
            for (l, st) in self.live() {
                for o in &st.fetched_by_origin {
                    let ol = OriginLabels {
                        device: l.device.clone(),
                        image: l.image.clone(),
                        origin: o.origin.clone(),
                        mirror: o.mirror.to_string(),
                    };
                    ConstCounter::new(o.bytes).encode(m.encode_family(&ol)?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "lazyblk_fetch_duration",
                "Latency of range requests to the remote, retries included",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (l, st) in self.live() {
                ConstHistogram::of(&st.fetch_latency).encode(m.encode_family(&l)?)?;
            }
        }
        if !self.host {
            return Ok(());
        }
        {
            let mut m = enc.encode_descriptor(
                "lazyblk_host_devices",
                "Devices with a record on this host, by whether their daemon answered",
                None,
                MetricType::Gauge,
            )?;
            let up = self.devices.iter().filter(|d| d.stats.is_some()).count() as u64;
            let down = self.devices.len() as u64 - up;
            for (state, n) in [("up", up), ("down", down)] {
                let l = StateLabels {
                    state: state.to_string(),
                };
                ConstGauge::new(n).encode(m.encode_family(&l)?)?;
            }
        }
        for s in SCALARS {
            let name = format!("lazyblk_host_{}", s.name);
            let unit = s.bytes.then_some(Unit::Bytes);
            let m = enc.encode_descriptor(&name, s.help, unit.as_ref(), s.kind)?;
            put(m, s.kind, self.live().map(|(_, st)| (s.get)(st)).sum())?;
        }
        {
            let mut m = enc.encode_descriptor(
                "lazyblk_host_origin_fetched",
                "Bytes received by range requests from each origin and mirror, all devices",
                Some(&Unit::Bytes),
                MetricType::Counter,
            )?;
            let all = sum_origins(self.live().flat_map(|(_, st)| st.fetched_by_origin.iter()));
            for o in all {
                let l = HostOriginLabels {
                    origin: o.origin,
                    mirror: o.mirror.to_string(),
                };
                ConstCounter::new(o.bytes).encode(m.encode_family(&l)?)?;
            }
        }
        let h = sum_histograms(self.live().map(|(_, st)| &st.fetch_latency));
        let m = enc.encode_descriptor(
            "lazyblk_host_fetch_duration",
            "Latency of range requests to the remote, all devices",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        ConstHistogram::of(&h).encode(m)
    }
}

/// The exposition of `devices` in the Prometheus text format 0.0.4; with `host`, plus the
/// host's totals (see the module doc).
pub fn encode(devices: &[Device], host: bool) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(Exposition {
        devices: devices.to_vec(),
        host,
    }));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &reg)
        .expect("writing to a String does not fail");
    out
}

/// The `Content-Type` of what [`encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One sample of an exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The series name (`lazyblk_misses_total`, `..._bucket`).
    pub name: String,
    /// Its labels, in the order written, values unescaped.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// The value of label `k`.
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// The value of the sample `name` whose labels include all of `labels`, if exactly one has them.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut it = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)));
    let first = it.next()?;
    it.next().is_none().then_some(first.value)
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// Labels as written: (name, unescaped value).
type Labels = Vec<(String, String)>;

fn parse_labels(s: &str) -> std::result::Result<(Labels, &str), String> {
    let mut rest = s;
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((out, r));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let key = rest[..eq].trim();
        if !valid_name(key) || key.starts_with("__") {
            return Err(format!("bad label name {key:?}"));
        }
        rest = rest[eq + 1..].trim_start();
        rest = rest.strip_prefix('"').ok_or("label value not quoted")?;
        let mut val = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => val.push('\\'),
                    Some((_, '"')) => val.push('"'),
                    Some((_, 'n')) => val.push('\n'),
                    _ => return Err("bad escape in a label value".into()),
                },
                Some((_, c)) => val.push(c),
            }
        };
        if out.iter().any(|(k, _): &(String, String)| k == key) {
            return Err(format!("label {key:?} twice"));
        }
        out.push((key.to_string(), val));
        rest = rest[end + 1..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("expected ',' or '}' after a label".into());
        }
    }
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if v
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) =>
        {
            v.parse().ok()
        }
        _ => None,
    }
}

/// Read an exposition in the Prometheus text format 0.0.4, strictly: every sample must belong
/// to a family declared by a `# TYPE` line before it (a histogram's `_bucket`, `_sum`, `_count`
/// to its histogram), names and labels must be well formed, values numbers, and no series
/// may appear twice. A check of what [`encode`] writes, for tests and the guest suites.
pub fn parse_text(text: &str) -> Result<Vec<Sample>> {
    let mut types: std::collections::HashMap<String, String> = Default::default();
    let mut seen: HashSet<(String, Vec<(String, String)>)> = HashSet::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |why: String| Error::Text { line: i + 1, why };
        if line.trim().is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut w = c.split_whitespace();
            match w.next() {
                Some("TYPE") => {
                    let (Some(n), Some(t), None) = (w.next(), w.next(), w.next()) else {
                        return Err(err("a TYPE line is `# TYPE name type`".into()));
                    };
                    if !valid_name(n) {
                        return Err(err(format!("bad metric name {n:?}")));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                        return Err(err(format!("unknown type {t:?}")));
                    }
                    if types.insert(n.to_string(), t.to_string()).is_some() {
                        return Err(err(format!("{n} declared twice")));
                    }
                }
                Some("HELP") if !w.next().is_some_and(valid_name) => {
                    return Err(err("a HELP line is `# HELP name text`".into()));
                }
                _ => {}
            }
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .ok_or_else(|| err("a sample without a value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(err(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(r) => parse_labels(r).map_err(err)?,
            None => (Vec::new(), &line[name_end..]),
        };
        let mut fields = rest.split_whitespace();
        let v = fields
            .next()
            .ok_or_else(|| err(format!("{name}: no value")))?;
        let value = parse_value(v).ok_or_else(|| err(format!("{name}: bad value {v:?}")))?;
        if let Some(ts) = fields.next() {
            if ts.parse::<i64>().is_err() || fields.next().is_some() {
                return Err(err(format!("{name}: junk after the value")));
            }
        }
        let family = if types.contains_key(name) {
            name
        } else {
            ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| name.strip_suffix(s))
                .find(|f| types.get(*f).map(String::as_str) == Some("histogram"))
                .ok_or_else(|| err(format!("{name}: no # TYPE line before it")))?
        };
        if types[family] == "histogram" && name.ends_with("_bucket") {
            let le = labels.iter().find(|(k, _)| k == "le");
            if le.is_none_or(|(_, v)| parse_value(v).is_none()) {
                return Err(err(format!("{name}: a bucket without a numeric le")));
            }
        }
        if !seen.insert((name.to_string(), labels.clone())) {
            return Err(err(format!("{name}: the same series twice")));
        }
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazyblk_chunkstore::FETCH_LATENCY_BOUNDS_US;

    fn snapshot(k: u64) -> StatsSnapshot {
        let mut counts = vec![0u64; FETCH_LATENCY_BOUNDS_US.len() + 1];
        counts[0] = k;
        counts[3] = 2 * k;
        counts[FETCH_LATENCY_BOUNDS_US.len()] = 1;
        StatsSnapshot {
            image: "sha256:ab".into(),
            hits: 10 * k,
            misses: 3 * k,
            requests: 4 * k,
            retries: k,
            bytes_fetched: 1000 * k,
            chunks_fetched: 5 * k,
            verify_failures: k,
            evicted_chunks: 2 * k,
            cached_bytes: 4096 * k,
            cache_limit: 1 << 30,
            present_chunks: 7 * k,
            total_chunks: 100,
            local_copies: 9,
            fetch_latency: HistogramSnapshot {
                bounds_us: FETCH_LATENCY_BOUNDS_US.to_vec(),
                counts,
                sum_us: 1_500_000 * k,
                count: 3 * k + 1,
            },
            fetched_by_origin: vec![
                OriginBytes {
                    origin: "http://127.0.0.1:8080".into(),
                    mirror: false,
                    bytes: 600 * k,
                },
                OriginBytes {
                    origin: "https://mirror.example".into(),
                    mirror: true,
                    bytes: 400 * k,
                },
            ],
            ..Default::default()
        }
    }

    fn dev(id: u32, k: Option<u64>) -> Device {
        Device {
            id,
            image: format!("sha256:{id}"),
            stats: k.map(snapshot),
        }
    }

    #[test]
    fn names_types_and_labels_follow_the_conventions() {
        let text = encode(&[dev(3, Some(1))], false);
        let s = parse_text(&text).unwrap();
        let v = |n: &str| value(&s, n, &[("device", "3"), ("image", "sha256:3")]);
        assert_eq!(v("lazyblk_up"), Some(1.0));
        assert_eq!(v("lazyblk_hits_total"), Some(10.0));
        assert_eq!(v("lazyblk_misses_total"), Some(3.0));
        assert_eq!(v("lazyblk_retries_total"), Some(1.0));
        assert_eq!(v("lazyblk_fetched_bytes_total"), Some(1000.0));
        assert_eq!(v("lazyblk_verify_failures_total"), Some(1.0));
        assert_eq!(v("lazyblk_evictions_total"), Some(2.0));
        assert_eq!(v("lazyblk_cache_bytes"), Some(4096.0));
        assert_eq!(v("lazyblk_local_copies_total"), Some(9.0));
        assert_eq!(v("lazyblk_local_copy_bytes_total"), Some(0.0));
        assert_eq!(v("lazyblk_local_copy_stale_total"), Some(0.0));
        assert_eq!(v("lazyblk_local_reflinks_total"), Some(0.0));
        assert_eq!(v("lazyblk_fetch_duration_seconds_count"), Some(4.0));
        assert_eq!(v("lazyblk_fetch_duration_seconds_sum"), Some(1.5));
        for (name, ty) in [
            ("lazyblk_misses_total", "counter"),
            ("lazyblk_fetched_bytes_total", "counter"),
            ("lazyblk_origin_fetched_bytes_total", "counter"),
            ("lazyblk_cache_bytes", "gauge"),
            ("lazyblk_fetch_duration_seconds", "histogram"),
        ] {
            assert!(
                text.contains(&format!("\n# TYPE {name} {ty}\n")),
                "{name}: {text}"
            );
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
        // Every series of a device carries both device labels; counters end in _total.
        for x in &s {
            assert_eq!(x.label("device"), Some("3"), "{x:?}");
            assert_eq!(x.label("image"), Some("sha256:3"), "{x:?}");
            assert!(x.name.starts_with("lazyblk_") && !x.name.starts_with("lazyblk_host"));
        }
        for line in text.lines().filter(|l| l.ends_with(" counter")) {
            assert!(
                line.trim_end_matches(" counter").ends_with("_total"),
                "{line}"
            );
        }
    }

    #[test]
    fn per_origin_bytes_carry_origin_and_mirror() {
        let s = parse_text(&encode(&[dev(1, Some(2))], false)).unwrap();
        let n = "lazyblk_origin_fetched_bytes_total";
        let o = [("origin", "http://127.0.0.1:8080"), ("mirror", "false")];
        assert_eq!(value(&s, n, &o), Some(1200.0));
        let m = [("origin", "https://mirror.example"), ("mirror", "true")];
        assert_eq!(value(&s, n, &m), Some(800.0));
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_count() {
        let s = parse_text(&encode(&[dev(1, Some(5))], false)).unwrap();
        let buckets: Vec<&Sample> = s
            .iter()
            .filter(|x| x.name == "lazyblk_fetch_duration_seconds_bucket")
            .collect();
        assert_eq!(buckets.len(), FETCH_LATENCY_BOUNDS_US.len() + 1);
        let les: Vec<f64> = buckets
            .iter()
            .map(|b| parse_value(b.label("le").unwrap()).unwrap())
            .collect();
        assert!(les.windows(2).all(|w| w[0] < w[1]), "{les:?}");
        assert_eq!(les[0], 0.001);
        assert_eq!(*les.last().unwrap(), f64::INFINITY);
        let vals: Vec<f64> = buckets.iter().map(|b| b.value).collect();
        assert_eq!(vals[0], 5.0);
        assert_eq!(vals[2], 5.0);
        assert_eq!(vals[3], 15.0, "counts add up: {vals:?}");
        assert!(vals.windows(2).all(|w| w[0] <= w[1]), "{vals:?}");
        assert_eq!(*vals.last().unwrap(), 16.0);
        assert_eq!(
            value(&s, "lazyblk_fetch_duration_seconds_count", &[]),
            Some(16.0)
        );
    }

    #[test]
    fn host_totals_sum_live_devices_and_a_dead_one_is_down() {
        let text = encode(&[dev(0, Some(1)), dev(1, Some(2)), dev(7, None)], true);
        let s = parse_text(&text).unwrap();
        assert_eq!(value(&s, "lazyblk_up", &[("device", "7")]), Some(0.0));
        assert_eq!(value(&s, "lazyblk_up", &[("device", "1")]), Some(1.0));
        // Nothing but `up` for the dead device.
        assert_eq!(
            s.iter().filter(|x| x.label("device") == Some("7")).count(),
            1
        );
        assert_eq!(value(&s, "lazyblk_host_misses_total", &[]), Some(9.0));
        assert_eq!(
            value(&s, "lazyblk_host_cache_bytes", &[]),
            Some(3.0 * 4096.0)
        );
        assert_eq!(
            value(&s, "lazyblk_host_devices", &[("state", "up")]),
            Some(2.0)
        );
        assert_eq!(
            value(&s, "lazyblk_host_devices", &[("state", "down")]),
            Some(1.0)
        );
        assert_eq!(
            value(
                &s,
                "lazyblk_host_origin_fetched_bytes_total",
                &[("mirror", "true")]
            ),
            Some(1200.0)
        );
        assert_eq!(
            value(&s, "lazyblk_host_fetch_duration_seconds_count", &[]),
            Some(4.0 + 7.0)
        );
        assert_eq!(
            value(
                &s,
                "lazyblk_host_fetch_duration_seconds_bucket",
                &[("le", "+Inf")]
            ),
            Some(11.0)
        );
        // Host series have no device labels.
        assert!(s
            .iter()
            .filter(|x| x.name.starts_with("lazyblk_host_"))
            .all(|x| x.label("device").is_none()));
    }

    #[test]
    fn label_values_are_escaped_and_read_back() {
        let mut d = dev(2, Some(1));
        d.image = "we\"ird\\\nimage".into();
        let s = parse_text(&encode(&[d], false)).unwrap();
        assert_eq!(
            value(&s, "lazyblk_up", &[("image", "we\"ird\\\nimage")]),
            Some(1.0)
        );
    }

    #[test]
    fn the_reader_refuses_what_is_not_the_format() {
        for (bad, why) in [
            ("x 1\n", "no # TYPE"),
            ("# TYPE x counter\nx{a=1} 1\n", "not quoted"),
            ("# TYPE x counter\nx{a=\"1} 1\n", "unterminated"),
            ("# TYPE x counter\nx one\n", "bad value"),
            ("# TYPE x counter\nx 1\nx 2\n", "twice"),
            ("# TYPE x gauge\n# TYPE x gauge\n", "declared twice"),
            ("# TYPE h histogram\nh_bucket 1\n", "numeric le"),
            ("# TYPE 1x counter\n", "bad metric name"),
        ] {
            let e = parse_text(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(parse_text("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 3\nh_count 3\n").is_ok());
    }
}
