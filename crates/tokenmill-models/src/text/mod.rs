//! A model's text side: its tokenizer ([`tokenizer`]) and chat template
//! ([`chat_template`]).

pub mod chat_template;
pub mod tokenizer;
