//! Shared by the `fidelity` and `peak` examples: a streaming OpenAI client that timestamps SSE
//! frames, guide-like prompts, and small statistics helpers.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llmsched_tokenizer::SimTokenizer;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .build(c)
}

/// What one streamed request looked like from the client.
#[derive(Debug, Clone, Default)]
pub struct Streamed {
    pub status: u16,
    pub tokens: usize,
    pub sent: Option<Instant>,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    pub cached_tokens: Option<u64>,
    pub error: Option<String>,
}

impl Streamed {
    /// TTFT in wall seconds.
    pub fn ttft(&self) -> Option<f64> {
        Some((self.first? - self.sent?).as_secs_f64())
    }

    /// (last − first) / (tokens − 1) in wall seconds.
    pub fn tpot(&self) -> Option<f64> {
        if self.tokens < 2 {
            return None;
        }
        Some((self.last? - self.first?).as_secs_f64() / (self.tokens - 1) as f64)
    }
}

/// POSTs a streaming `/v1/completions` request and timestamps every token frame.
pub async fn stream(c: &HttpClient, addr: SocketAddr, body: impl Into<Bytes>) -> Streamed {
    stream_with(c, addr, body, None).await
}

/// Like [`stream`]; also pushes the TTFT (wall seconds) to `ttfts` as soon as it is known.
pub async fn stream_with(
    c: &HttpClient,
    addr: SocketAddr,
    body: impl Into<Bytes>,
    ttfts: Option<&parking_lot::Mutex<Vec<f64>>>,
) -> Streamed {
    let mut out = Streamed::default();
    let req = match http::Request::post(format!("http://{addr}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
    {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    out.sent = Some(Instant::now());
    let resp = match c.request(req).await {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    out.status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut tail = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            out.error = Some("body error".into());
            break;
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        // Count token frames: every `"text":"` is one token chunk.
        let n = count(data, b"\"text\":\"");
        if n > 0 {
            if out.first.is_none() {
                out.first = Some(now);
                if let (Some(t), Some(sent)) = (ttfts, out.sent) {
                    t.lock().push((now - sent).as_secs_f64());
                }
            }
            out.last = Some(now);
            out.tokens += n;
        }
        if let Some(i) = find(data, b"\"cached_tokens\":") {
            tail.extend_from_slice(&data[i + 16..]);
        }
    }
    if !tail.is_empty() {
        let digits: String = tail
            .iter()
            .map(|&b| b as char)
            .take_while(char::is_ascii_digit)
            .collect();
        out.cached_tokens = digits.parse().ok();
    }
    out
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn count(h: &[u8], n: &[u8]) -> usize {
    h.windows(n.len()).filter(|w| *w == n).count()
}

/// Deterministic pseudo-random words: `n` words seeded by `seed` (every word one token).
pub fn random_words(seed: u64, n: usize, out: &mut String) {
    let t = SimTokenizer::default();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if i > 0 || !out.is_empty() {
            out.push(' ');
        }
        t.write_word((x % u64::from(SimTokenizer::DEFAULT_VOCAB)) as u32, out);
    }
}

/// The guide's shared-prefix prompt: a 6,000-token system prompt for `group` and a
/// 1,200-token question `question`.
pub fn guide_prompt(group: u64, question: u64, prefix_len: usize, question_len: usize) -> String {
    let mut s = String::with_capacity((prefix_len + question_len) * 5);
    random_words(1_000_003 * (group + 1), prefix_len, &mut s);
    random_words(7_919 * (question + 1) + 13, question_len, &mut s);
    s
}

pub fn body(prompt: &str, max_tokens: usize) -> String {
    format!(
        r#"{{"model":"Qwen/Qwen3-32B","prompt":"{prompt}","max_tokens":{max_tokens},"ignore_eos":true,"stream":true,"stream_options":{{"include_usage":true}}}}"#
    )
}

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let idx = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[idx.min(s.len() - 1)]
}

/// CPU seconds (user + system) used by this process's threads whose name starts with
/// `prefix` (all threads if empty), from /proc. Linux only; clock ticks are 1/100 s.
pub fn thread_cpu_seconds(prefix: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let mut ticks = 0u64;
    for entry in dir.flatten() {
        let path = entry.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !name.trim_end().starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // Fields after the parenthesised name: state is field 3; utime 14, stime 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
        let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        ticks += ut + st;
    }
    ticks as f64 / 100.0
}

/// Whole-process CPU seconds (includes exited threads), from /proc/self/stat.
pub fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    (ut + st) as f64 / 100.0
}

pub fn pct_diff(sim: f64, reference: f64) -> f64 {
    (sim - reference) / reference * 100.0
}

pub fn ms(v: f64) -> String {
    format!("{:.1} ms", v * 1000.0)
}

pub fn sleep_until(t: Instant) -> tokio::time::Sleep {
    tokio::time::sleep_until(t.into())
}

pub const SECOND: Duration = Duration::from_secs(1);
