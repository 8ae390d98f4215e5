//! The two bodies of a disaggregated request (vLLM's NIXL connector protocol, as llm-d's
//! `nixlv2` connector builds them).
//!
//! * **Prefill** ([`prefill_body`]): the client's body with `kv_transfer_params` =
//!   `{do_remote_decode: true, do_remote_prefill: false, remote_engine_id: null,
//!   remote_block_ids: null, remote_host: null, remote_port: null}`, `stream: false`, no
//!   `stream_options`, and the token limit(s) set to 1 (`max_tokens` and
//!   `max_completion_tokens` for completions and chat, `max_output_tokens` for responses).
//!   `min_tokens` is removed too (the reference keeps it, and vLLM then rejects
//!   `min_tokens > max_tokens = 1` with a 400).
//! * **Decode** ([`decode_body`]): the client's body, unchanged (its `stream`,
//!   `stream_options`, limits…), with `kv_transfer_params` replaced by what the prefill
//!   replica returned.

use serde_json::{Map, Value, json};

/// Which OpenAI API a P/D request uses (the token-limit fields differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// `/v1/completions` and `/v1/chat/completions`.
    Completions,
    /// `/v1/responses`.
    Responses,
}

impl ApiKind {
    /// The API of a path the sidecar disaggregates, `None` for every other path (passed
    /// through untouched).
    pub fn of_path(path: &str) -> Option<Self> {
        match path {
            "/v1/completions" | "/v1/chat/completions" => Some(Self::Completions),
            "/v1/responses" => Some(Self::Responses),
            _ => None,
        }
    }

    /// Token-limit fields set to 1 for the prefill.
    pub fn token_limit_fields(self) -> &'static [&'static str] {
        match self {
            Self::Completions => &["max_tokens", "max_completion_tokens"],
            Self::Responses => &["max_output_tokens"],
        }
    }
}

/// `kv_transfer_params` asking a prefill replica to prefill for a remote decoder.
pub fn remote_decode_params() -> Value {
    json!({
        "do_remote_decode": true,
        "do_remote_prefill": false,
        "remote_engine_id": null,
        "remote_block_ids": null,
        "remote_host": null,
        "remote_port": null,
    })
}

/// The prefill request's body.
pub fn prefill_body(original: &Map<String, Value>, api: ApiKind) -> Map<String, Value> {
    let mut b = original.clone();
    b.insert("kv_transfer_params".into(), remote_decode_params());
    b.insert("stream".into(), Value::Bool(false));
    b.remove("stream_options");
    b.remove("min_tokens");
    for f in api.token_limit_fields() {
        b.insert((*f).to_string(), json!(1));
    }
    b
}

/// The decode request's body: the original with the prefill replica's `kv_transfer_params`.
pub fn decode_body(original: &Map<String, Value>, kv: Value) -> Map<String, Value> {
    let mut b = original.clone();
    b.insert("kv_transfer_params".into(), kv);
    b
}

/// `usage.prompt_tokens_details.cached_tokens` of a response (vLLM sends `null` details when
/// nothing was cached: 0 then, as the reference reads it).
pub fn cached_tokens(response: &Value) -> u64 {
    response
        .get("usage")
        .and_then(|u| u.get("prompt_tokens_details"))
        .and_then(|d| d.get("cached_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn prefill_asks_for_one_token_without_streaming() {
        let original = obj(json!({"model": "m", "prompt": "p", "stream": true,
            "stream_options": {"include_usage": true}, "max_tokens": 500, "min_tokens": 10,
            "temperature": 0.5, "kv_transfer_params": {"junk": 1}}));
        let p = prefill_body(&original, ApiKind::Completions);
        assert_eq!(p["stream"], false);
        assert!(!p.contains_key("stream_options"));
        assert!(!p.contains_key("min_tokens"));
        assert_eq!(p["max_tokens"], 1);
        assert_eq!(p["max_completion_tokens"], 1);
        assert_eq!(p["temperature"], 0.5);
        assert_eq!(p["kv_transfer_params"], remote_decode_params());
        assert_eq!(p["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(p["kv_transfer_params"]["remote_block_ids"], Value::Null);
        // The original is untouched.
        assert_eq!(original["stream"], true);
        let r = prefill_body(
            &obj(json!({"input": "x", "max_output_tokens": 9})),
            ApiKind::Responses,
        );
        assert_eq!(r["max_output_tokens"], 1);
        assert!(!r.contains_key("max_tokens"));
    }

    #[test]
    fn decode_keeps_the_original_and_carries_the_params() {
        let original = obj(json!({"prompt": "p", "stream": true, "max_tokens": 500}));
        let kv = json!({"do_remote_prefill": true, "remote_block_ids": [1, 2]});
        let d = decode_body(&original, kv.clone());
        assert_eq!(d["stream"], true);
        assert_eq!(d["max_tokens"], 500);
        assert!(!d.contains_key("max_completion_tokens"));
        assert_eq!(d["kv_transfer_params"], kv);
    }

    #[test]
    fn paths_and_cached_tokens() {
        assert_eq!(
            ApiKind::of_path("/v1/chat/completions"),
            Some(ApiKind::Completions)
        );
        assert_eq!(ApiKind::of_path("/v1/responses"), Some(ApiKind::Responses));
        assert_eq!(ApiKind::of_path("/v1/models"), None);
        assert_eq!(
            cached_tokens(&json!({"usage": {"prompt_tokens_details": {"cached_tokens": 7}}})),
            7
        );
        assert_eq!(
            cached_tokens(&json!({"usage": {"prompt_tokens_details": null}})),
            0
        );
        assert_eq!(cached_tokens(&json!({})), 0);
    }
}
