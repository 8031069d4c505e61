//! Chat templates: the model's own Jinja template (GGUF metadata key
//! `tokenizer.chat_template`) rendered with minijinja.

use crate::error::{ModelError, Result};
use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

/// ChatML, used when a model ships no template of its own.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// One message as the template sees it.
#[derive(Serialize)]
pub struct TemplateMessage<'a> {
    /// "system", "user" or "assistant".
    pub role: &'a str,
    /// The message text.
    pub content: &'a str,
}

impl ChatTemplate {
    /// Compiles `source` (or ChatML when `None`).
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // Templates written for Hugging Face's Jinja call Python string
        // methods (`.strip()`, `.startswith()`); pycompat provides them.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.unwrap_or(CHATML).to_owned())
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Renders the conversation, ending with the prompt of an assistant turn.
    pub fn render(&self, messages: &[TemplateMessage<'_>]) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_renders_a_generation_prompt() {
        let t = ChatTemplate::new(None, "", "").unwrap();
        let out = t
            .render(&[TemplateMessage {
                role: "user",
                content: "hi",
            }])
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = ChatTemplate::new(Some("{{ raise_exception('no system role') }}"), "", "").unwrap();
        let err = t.render(&[]).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new(
            Some("{% for m in messages %}{{ m['content'].strip() }}{% endfor %}"),
            "",
            "",
        )
        .unwrap();
        let out = t
            .render(&[TemplateMessage {
                role: "user",
                content: "  x  ",
            }])
            .unwrap();
        assert_eq!(out, "x");
    }
}
