//! A strict parser/validator for the Prometheus text exposition format (version 0.0.4),
//! written from the format's specification, independent of the simulator's renderer:
//! metric names `[a-zA-Z_:][a-zA-Z0-9_:]*`, label names `[a-zA-Z_][a-zA-Z0-9_]*`, label values
//! with `\\`, `\"`, `\n` escapes only, Go-style float values (`+Inf`, `-Inf`, `NaN`), at most one
//! HELP and TYPE per family before its samples, contiguous families, no duplicate series,
//! and for histograms: `_bucket` series with ascending `le`, non-decreasing cumulative counts,
//! a `+Inf` bucket equal to `_count`, and a `_sum`.

use std::collections::{BTreeMap, HashMap, HashSet};

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

#[derive(Debug)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: HashMap<String, String>,
    pub text: String,
}

fn is_name(s: &str, colons: bool) -> bool {
    let mut chars = s.chars();
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':');
    match chars.next() {
        Some(c) if ok_first(c) => {}
        _ => return false,
    }
    chars.all(|c| ok_first(c) || c.is_ascii_digit())
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse::<f64>().map_err(|_| format!("bad value {v:?}")),
    }
}

fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    // s starts right after '{'
    let mut labels = Labels::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(' ');
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = &rest[..eq];
        if !is_name(name, false) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, '\n')) => return Err("newline in label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("duplicate label {name}"));
        }
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn family_of(name: &str, types: &HashMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).map(String::as_str) == Some("histogram")
        {
            return base.to_string();
        }
    }
    name.to_string()
}

pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut samples = Vec::new();
    let mut seen_series = HashSet::new();
    let mut finished_families: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let ctx = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut parts = rest.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("HELP") => {
                    let name = parts
                        .next()
                        .ok_or_else(|| ctx("HELP without name".into()))?;
                    if !is_name(name, true) || !helps.insert(name.to_string()) {
                        return Err(ctx("bad or repeated HELP".into()));
                    }
                }
                Some("TYPE") => {
                    let name = parts
                        .next()
                        .ok_or_else(|| ctx("TYPE without name".into()))?;
                    let kind = parts
                        .next()
                        .ok_or_else(|| ctx("TYPE without type".into()))?;
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(ctx(format!("unknown type {kind}")));
                    }
                    if !is_name(name, true) || types.insert(name.into(), kind.into()).is_some() {
                        return Err(ctx("bad or repeated TYPE".into()));
                    }
                    if samples
                        .iter()
                        .any(|s: &Sample| family_of(&s.name, &types) == name)
                    {
                        return Err(ctx("TYPE after the family's samples".into()));
                    }
                }
                _ => {}
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| ctx("no value".into()))?;
        let name = &line[..name_end];
        if !is_name(name, true) {
            return Err(ctx(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end + 1..]).map_err(ctx)?
        } else {
            (Labels::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value =
            parse_value(fields.next().ok_or_else(|| ctx("no value".into()))?).map_err(ctx)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| ctx("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(ctx("trailing fields".into()));
        }
        let family = family_of(name, &types);
        if current.as_deref() != Some(family.as_str()) {
            if finished_families.contains(&family) {
                return Err(ctx(format!("family {family} is not contiguous")));
            }
            if let Some(prev) = current.take() {
                finished_families.insert(prev);
            }
            current = Some(family.clone());
        }
        if types.get(&family).map(String::as_str) == Some("histogram")
            && name.ends_with("_bucket")
            && !labels.contains_key("le")
        {
            return Err(ctx("histogram bucket without le".into()));
        }
        if !seen_series.insert((name.to_string(), labels.clone())) {
            return Err(ctx("duplicate series".into()));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    // Histogram consistency.
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for s in samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let mut key = s.labels.clone();
            let le = key.remove("le").unwrap_or_default();
            series
                .entry(key)
                .or_default()
                .push((parse_value(&le)?, s.value));
        }
        for (key, buckets) in series {
            if !buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
            {
                return Err(format!("{family}: buckets not ascending/cumulative"));
            }
            let inf = buckets
                .last()
                .filter(|b| b.0.is_infinite())
                .ok_or(format!("{family}: no +Inf bucket"))?;
            let find = |suffix: &str| {
                samples
                    .iter()
                    .find(|s| s.name == format!("{family}{suffix}") && s.labels == key)
                    .map(|s| s.value)
            };
            let count = find("_count").ok_or(format!("{family}: no _count"))?;
            find("_sum").ok_or(format!("{family}: no _sum"))?;
            if count != inf.1 {
                return Err(format!("{family}: +Inf bucket {} != count {count}", inf.1));
            }
        }
    }
    Ok(Exposition {
        samples,
        types,
        text: text.to_string(),
    })
}

impl Exposition {
    /// The value of the one sample named `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matches: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert_eq!(matches.len(), 1, "{name} {labels:?} in:\n{}", self.text);
        matches[0].value
    }

    /// (count, sum) of a histogram family.
    pub fn histogram(&self, family: &str) -> (f64, f64) {
        (
            self.value(&format!("{family}_count"), &[]),
            self.value(&format!("{family}_sum"), &[]),
        )
    }

    /// Labels of the one sample named `name`.
    pub fn labels(&self, name: &str) -> Labels {
        let s: Vec<&Sample> = self.samples.iter().filter(|s| s.name == name).collect();
        assert_eq!(s.len(), 1, "{name}");
        s[0].labels.clone()
    }

    pub fn kind(&self, family: &str) -> Option<&str> {
        self.types.get(family).map(String::as_str)
    }
}

#[test]
fn the_validator_rejects_what_the_spec_forbids() {
    assert!(parse("# TYPE a counter\na_total 1\n").is_ok());
    assert!(parse("a:b{x=\"1\"} 1\n").is_ok());
    assert!(parse("1a 1\n").is_err());
    assert!(parse("a{1x=\"1\"} 1\n").is_err());
    assert!(parse("a{x=\"\\t\"} 1\n").is_err());
    assert!(parse("a one\n").is_err());
    assert!(parse("a 1\na 2\n").is_err());
    assert!(parse("a 1\nb 1\na{x=\"1\"} 1\n").is_err());
    assert!(parse("a 1\n# TYPE a gauge\n").is_err());
    let h =
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n";
    assert!(parse(h).is_err());
    let h =
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 3\nh_sum 0\n";
    assert!(parse(h).is_err());
    let h =
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 2\nh_sum 0\n";
    assert!(parse(h).is_ok());
}
