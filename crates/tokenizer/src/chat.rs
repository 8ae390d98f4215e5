//! Chat prompt rendering: turning `messages` into the text the engine tokenizes.
//!
//! An engine renders a chat request with the model's chat template before tokenizing it; a
//! scheduler that predicts the engine's KV-cache blocks must render it the same way, byte for
//! byte. Two renderers:
//!
//! * the **simulator's format** ([`render_sim_chat`], [`ChatTemplate::sim`]): each message as
//!   `role content\n`, then the generation prompt `assistant`. It needs no model files, so the
//!   simulator and the precise prefix scorer agree out of the box. [`SIM_CHAT_TEMPLATE`] is the
//!   same format as Jinja source (a test keeps the two identical);
//! * a **Jinja chat template** ([`ChatTemplate::from_source`],
//!   [`ChatTemplate::from_tokenizer_config`]): the `chat_template` of a Hugging Face
//!   `tokenizer_config.json`, rendered with MiniJinja configured like `transformers` renders
//!   it (`trim_blocks`, `lstrip_blocks`, Python string methods such as `.strip()`,
//!   `raise_exception`, `strftime_now`, `tojson`), with `messages`, `add_generation_prompt`,
//!   `bos_token` and `eos_token` in the context.
//!
//! Messages carry text content only (multi-part content flattened by the caller); templates
//! that need tools or images render as if there were none.

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value};

/// The simulator's chat format as a Jinja template (equivalent to [`render_sim_chat`]).
pub const SIM_CHAT_TEMPLATE: &str = "{% for message in messages %}{{ message.role }} {{ message.content }}\n{% endfor %}{% if add_generation_prompt %}assistant{% endif %}";

/// The template's name inside its MiniJinja environment.
const TEMPLATE_NAME: &str = "chat";

/// Errors raised while loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// `tokenizer_config.json` could not be read or parsed.
    #[error("cannot read chat template from {path}: {message}")]
    Config {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The template does not compile.
    #[error("invalid chat template: {0}")]
    Syntax(String),
    /// Rendering failed (including the template's own `raise_exception`).
    #[error("cannot render chat template: {0}")]
    Render(String),
}

/// Renders chat messages the way the simulator does: `role content\n` per message, then
/// `assistant`.
pub fn render_sim_chat<'a, I>(messages: I) -> String
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    let mut s = String::new();
    for (role, content) in messages {
        s.reserve(role.len() + content.len() + 2);
        s.push_str(role);
        s.push(' ');
        s.push_str(content);
        s.push('\n');
    }
    s.push_str("assistant");
    s
}

#[derive(serde::Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(serde::Serialize)]
struct Context<'a> {
    messages: Vec<Message<'a>>,
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
}

enum Renderer {
    Sim,
    Jinja(Box<Environment<'static>>),
}

/// A chat template, ready to render.
pub struct ChatTemplate {
    renderer: Renderer,
    bos_token: String,
    eos_token: String,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("sim", &matches!(self.renderer, Renderer::Sim))
            .field("source_len", &self.source.len())
            .finish()
    }
}

impl Default for ChatTemplate {
    fn default() -> Self {
        Self::sim()
    }
}

impl ChatTemplate {
    /// The simulator's format (no Jinja involved).
    pub fn sim() -> Self {
        Self {
            renderer: Renderer::Sim,
            bos_token: String::new(),
            eos_token: String::new(),
            source: SIM_CHAT_TEMPLATE.to_string(),
        }
    }

    /// Compiles a Jinja chat template.
    pub fn from_source(
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        // As `transformers` renders chat templates.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| -> String {
            strftime_now(&format)
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ChatTemplateError::Syntax(e.to_string()))?;
        Ok(Self {
            renderer: Renderer::Jinja(Box::new(env)),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            source: source.to_string(),
        })
    }

    /// Loads the `chat_template` of a `tokenizer_config.json` (`path` is the file or the
    /// directory holding it). `Ok(None)` when the file has no chat template. A list of named
    /// templates (`[{name, template}]`) selects the one named `default`.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>, ChatTemplateError> {
        let file = if path.is_dir() {
            path.join("tokenizer_config.json")
        } else {
            path.to_path_buf()
        };
        let err = |message: String| ChatTemplateError::Config {
            path: file.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(&file).map_err(|e| err(e.to_string()))?;
        let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        let template = match cfg.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => {
                let pick = named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| named.first());
                match pick
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                {
                    Some(t) => t.to_string(),
                    None => return Err(err("chat_template list has no usable template".into())),
                }
            }
            Some(other) => {
                return Err(err(format!(
                    "chat_template must be a string or a list, got {other}"
                )));
            }
        };
        let token = |key: &str| -> String {
            match cfg.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Object(o)) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string(),
                _ => String::new(),
            }
        };
        Self::from_source(&template, &token("bos_token"), &token("eos_token")).map(Some)
    }

    /// True for the built-in simulator format.
    pub fn is_sim(&self) -> bool {
        matches!(self.renderer, Renderer::Sim)
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `(role, content)` messages into the prompt text.
    pub fn render<'a, I>(
        &self,
        messages: I,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        match &self.renderer {
            Renderer::Sim => {
                let mut s = render_sim_chat(messages);
                if !add_generation_prompt {
                    s.truncate(s.len() - "assistant".len());
                }
                Ok(s)
            }
            Renderer::Jinja(env) => {
                let tmpl = env
                    .get_template(TEMPLATE_NAME)
                    .map_err(|e| ChatTemplateError::Render(e.to_string()))?;
                let ctx = Context {
                    messages: messages
                        .into_iter()
                        .map(|(role, content)| Message { role, content })
                        .collect(),
                    add_generation_prompt,
                    bos_token: &self.bos_token,
                    eos_token: &self.eos_token,
                };
                tmpl.render(ctx)
                    .map_err(|e| ChatTemplateError::Render(e.to_string()))
            }
        }
    }
}

/// `strftime_now(format)` for templates that print today's date: UTC, supporting the
/// directives templates use (`%Y %m %d %H %M %S %b %B %y %j %%`); others are kept verbatim.
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(secs, format)
}

fn format_utc(secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::with_capacity(format.len() + 8);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y % 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<(&'static str, &'static str)> {
        vec![
            ("system", "You are terse."),
            ("user", "What is a KV cache?\nBe brief."),
            ("assistant", "A cache of keys and values."),
            ("user", "Thanks!"),
        ]
    }

    #[test]
    fn sim_format_is_role_space_content_newline_then_assistant() {
        assert_eq!(
            render_sim_chat(msgs()),
            "system You are terse.\nuser What is a KV cache?\nBe brief.\nassistant A cache of keys and values.\nuser Thanks!\nassistant"
        );
        assert_eq!(render_sim_chat([]), "assistant");
    }

    #[test]
    fn the_jinja_sim_template_is_byte_identical_to_the_fast_path() {
        let jinja = ChatTemplate::from_source(SIM_CHAT_TEMPLATE, "", "").unwrap();
        // trim_blocks / lstrip_blocks must not eat the template's own newlines.
        for m in [
            msgs(),
            vec![],
            vec![("user", "  padded  ")],
            vec![("a", "")],
        ] {
            let want = render_sim_chat(m.iter().copied());
            assert_eq!(jinja.render(m.iter().copied(), true).unwrap(), want);
            assert_eq!(
                ChatTemplate::sim().render(m.iter().copied(), true).unwrap(),
                want
            );
            let no_gen = want.strip_suffix("assistant").unwrap();
            assert_eq!(jinja.render(m.iter().copied(), false).unwrap(), no_gen);
            assert_eq!(
                ChatTemplate::sim()
                    .render(m.iter().copied(), false)
                    .unwrap(),
                no_gen
            );
        }
    }

    /// A ChatML-style template using what real templates use: `bos_token`, loop variables,
    /// Python string methods, `raise_exception`, whitespace control.
    const CHATML: &str = "{{ bos_token }}{%- for message in messages %}\n{%- if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' ~ message['role']) }}{% endif %}\n{{- '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' + '\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n{{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

    #[test]
    fn jinja_templates_render_like_transformers() {
        let t = ChatTemplate::from_source(CHATML, "<s>", "</s>").unwrap();
        let out = t
            .render([("system", " Be terse. "), ("user", "Hi")], true)
            .unwrap();
        assert_eq!(
            out,
            "<s><|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let err = t.render([("robot", "x")], true).unwrap_err().to_string();
        assert!(err.contains("bad role robot"), "{err}");
        assert!(matches!(
            ChatTemplate::from_source("{% for %}", "", ""),
            Err(ChatTemplateError::Syntax(_))
        ));
    }

    #[test]
    fn tokenizer_config_templates_and_tokens_are_read() {
        let dir = std::env::temp_dir().join(format!("llmsched-chat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}"},
            ],
        });
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = ChatTemplate::from_tokenizer_config(&dir).unwrap().unwrap();
        assert!(!t.is_sim());
        assert_eq!(t.render([("user", "hi")], true).unwrap(), "<s>[user]hi</s>");

        std::fs::write(dir.join("tokenizer_config.json"), r#"{"bos_token": "<s>"}"#).unwrap();
        assert!(ChatTemplate::from_tokenizer_config(&dir).unwrap().is_none());
        std::fs::write(dir.join("tokenizer_config.json"), "{not json").unwrap();
        let e = ChatTemplate::from_tokenizer_config(&dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer_config.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn strftime_subset() {
        // 2024-02-29 13:05:09 UTC.
        let secs = 1_709_211_909;
        assert_eq!(
            format_utc(secs, "%Y-%m-%d %H:%M:%S %d %b %Y %j %y %% %q"),
            "2024-02-29 13:05:09 29 Feb 2024 060 24 % %q"
        );
        assert_eq!(format_utc(0, "%d %B %Y"), "01 January 1970");
    }
}
