//! Label selectors (`a=b,c!=d,e in (x,y),f notin (z),g,!h`) and field selectors
//! (`metadata.name=n,metadata.namespace!=m`), parsed and matched as the API server does.

use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelOp {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    reqs: Vec<(String, LabelOp)>,
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_label_key(k: &str) -> bool {
    if k.is_empty() || k.len() > 316 {
        return false;
    }
    let name = match k.rsplit_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty()
                || !prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                return false;
            }
            name
        }
        None => k,
    };
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn valid_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

fn parse_set(rest: &str, raw: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: found '{raw}', expected: '('"))?;
    let vals: Vec<String> = inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    if vals.is_empty() {
        return Err(format!(
            "unable to parse requirement: for 'in', 'notin' operators, values set can't be empty: '{raw}'"
        ));
    }
    for v in &vals {
        if !valid_label_value(v) {
            return Err(format!(
                "unable to parse requirement: invalid label value: \"{v}\""
            ));
        }
    }
    Ok(vals)
}

impl LabelSelector {
    /// Parses the `labelSelector` query string.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self { reqs });
        }
        for raw in split_top_level(s) {
            let term = raw.trim();
            if term.is_empty() {
                return Err(format!("unable to parse requirement: found '', in '{s}'"));
            }
            let (key, op) = if let Some(k) = term.strip_prefix('!') {
                (k.trim().to_string(), LabelOp::DoesNotExist)
            } else if let Some((k, v)) = term.split_once("!=") {
                (k.trim().to_string(), LabelOp::NotEq(v.trim().to_string()))
            } else if let Some((k, v)) = term.split_once("==") {
                (k.trim().to_string(), LabelOp::Eq(v.trim().to_string()))
            } else if let Some((k, v)) = term.split_once('=') {
                (k.trim().to_string(), LabelOp::Eq(v.trim().to_string()))
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                (k.trim().to_string(), LabelOp::NotIn(parse_set(rest, term)?))
            } else if let Some((k, rest)) = term.split_once(" in ") {
                (k.trim().to_string(), LabelOp::In(parse_set(rest, term)?))
            } else {
                (term.to_string(), LabelOp::Exists)
            };
            if !valid_label_key(&key) {
                return Err(format!(
                    "unable to parse requirement: invalid label key \"{key}\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
                ));
            }
            if let LabelOp::Eq(v) | LabelOp::NotEq(v) = &op
                && !valid_label_value(v)
            {
                return Err(format!(
                    "unable to parse requirement: invalid label value: \"{v}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
                ));
            }
            reqs.push((key, op));
        }
        Ok(Self { reqs })
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.reqs.iter().all(|(k, op)| match op {
            LabelOp::Eq(v) => get(k) == Some(v.as_str()),
            LabelOp::NotEq(v) => get(k) != Some(v.as_str()),
            LabelOp::In(vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelOp::NotIn(vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            LabelOp::Exists => get(k).is_some(),
            LabelOp::DoesNotExist => get(k).is_none(),
        })
    }
}

/// A parsed field selector: `field=value`, `field==value`, `field!=value`, comma-joined.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

/// Fields every kind supports.
const COMMON_FIELDS: &[&str] = &["metadata.name", "metadata.namespace"];
/// Extra fields the real server supports for pods.
const POD_FIELDS: &[&str] = &[
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];

impl FieldSelector {
    /// Parses a `fieldSelector` for a kind (`Pod` accepts the pod fields too); unsupported
    /// fields are refused with the server's message.
    pub fn parse(s: &str, kind: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self { reqs });
        }
        for raw in s.split(',') {
            let term = raw.trim();
            let (field, eq, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                ));
            };
            let field = field.trim();
            let supported =
                COMMON_FIELDS.contains(&field) || (kind == "Pod" && POD_FIELDS.contains(&field));
            if !supported {
                return Err(format!("field label not supported: {field}"));
            }
            reqs.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(Self { reqs })
    }

    /// Whether the object satisfies every requirement (a missing field reads as `""`).
    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|(field, eq, want)| {
            let ptr = format!("/{}", field.replace('.', "/"));
            let have = match obj.pointer(&ptr) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            (have == *want) == *eq
        })
    }

    /// The value of an equality requirement on `metadata.name`, if any.
    pub fn name_eq(&self) -> Option<&str> {
        self.reqs
            .iter()
            .find(|(f, eq, _)| *eq && f == "metadata.name")
            .map(|(_, _, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn equality_and_sets() {
        let o = obj(json!({"app": "vllm", "tier": "gpu"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m(""));
        assert!(m("app=vllm"));
        assert!(m("app==vllm,tier=gpu"));
        assert!(!m("app=vllm,tier=cpu"));
        assert!(m("app!=sglang"));
        assert!(!m("app!=vllm"));
        assert!(m("tier in (cpu, gpu)"));
        assert!(!m("tier notin (cpu,gpu)"));
        assert!(m("tier notin (cpu),app in (vllm)"));
        assert!(m("app"));
        assert!(!m("!app"));
        assert!(m("!missing"));
        assert!(m("missing!=x"));
        assert!(!m("missing in (x)"));
        assert!(m("missing notin (x)"));
        assert!(m("example.com/role!=decode"));
    }

    #[test]
    fn bad_label_selectors_are_refused() {
        for bad in [
            "app=",
            "=x",
            "a b",
            "app in x",
            "app in ()",
            "app=vl lm",
            ",",
            "a,,b",
        ] {
            if bad == "app=" {
                // An empty value is valid: `app=` selects labels equal to "".
                assert!(LabelSelector::parse(bad).is_ok());
                continue;
            }
            assert!(
                LabelSelector::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn field_selectors() {
        let o =
            json!({"metadata": {"name": "p", "namespace": "ns"}, "status": {"phase": "Running"}});
        let f = FieldSelector::parse("metadata.name=p", "Pod").unwrap();
        assert!(f.matches(&o));
        assert_eq!(f.name_eq(), Some("p"));
        assert!(
            !FieldSelector::parse("metadata.name!=p", "Pod")
                .unwrap()
                .matches(&o)
        );
        assert!(
            FieldSelector::parse("metadata.namespace==ns,status.phase=Running", "Pod")
                .unwrap()
                .matches(&o)
        );
        assert_eq!(
            FieldSelector::parse("status.phase=Running", "InferencePool").unwrap_err(),
            "field label not supported: status.phase"
        );
        assert!(FieldSelector::parse("metadata.name", "Pod").is_err());
    }
}
