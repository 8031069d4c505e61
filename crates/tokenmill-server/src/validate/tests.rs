//! Every rule of the validator, with the `param`, status and code of each
//! refusal, against the fake engine (one token per word; a chat adds a token
//! per message and one for the answer).

use super::*;
use crate::testing::{role_token, FakeEngine, FAIL, MODEL};
use serde_json::{json, Value};
use std::time::{Duration, UNIX_EPOCH};
use tokenmill_protocol::{KeyId, SamplingParams, TenantId};

/// The fake model's context, and its KV cache unless a test says otherwise.
const CONTEXT: usize = 64;

fn validator_with(kv_capacity: usize, limits: Limits) -> Validator {
    Validator::new(Arc::new(FakeEngine::new(CONTEXT, kv_capacity)), &limits)
}

fn validator() -> Validator {
    validator_with(CONTEXT, Limits::default())
}

fn meta() -> RequestMeta {
    RequestMeta {
        id: RequestId("cmpl-test".to_owned()),
        caller: Caller {
            tenant: TenantId("acme".to_owned()),
            key_id: KeyId("key-1".to_owned()),
            weight: 3,
        },
        arrived_at: UNIX_EPOCH + Duration::from_secs(1_000),
    }
}

/// `base` with the fields of `changes` set (a `"$remove"` value removes one).
fn with(mut base: Value, changes: Value) -> Value {
    if let (Some(map), Value::Object(changes)) = (base.as_object_mut(), changes) {
        for (key, value) in changes {
            if value == json!("$remove") {
                map.remove(&key);
            } else {
                map.insert(key, value);
            }
        }
    }
    base
}

fn completion_body(changes: Value) -> Value {
    with(
        json!({"model": MODEL, "prompt": "hello there", "max_tokens": 4}),
        changes,
    )
}

fn chat_body(changes: Value) -> Value {
    with(
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4}),
        changes,
    )
}

fn complete_on(v: &Validator, changes: Value) -> Result<ValidRequest, ApiError> {
    v.completion(completion_body(changes).to_string().as_bytes(), meta())
}

fn chat_on(v: &Validator, changes: Value) -> Result<ValidRequest, ApiError> {
    v.chat(chat_body(changes).to_string().as_bytes(), meta())
}

fn complete(changes: Value) -> Result<ValidRequest, ApiError> {
    complete_on(&validator(), changes)
}

fn chat(changes: Value) -> Result<ValidRequest, ApiError> {
    chat_on(&validator(), changes)
}

fn accepted(result: Result<ValidRequest, ApiError>) -> GenerateRequest {
    match result {
        Ok(valid) => valid.into_request(),
        Err(e) => panic!("refused: {e:?}"),
    }
}

/// The refusal's status, `param` and `code`, as the client sees them.
fn refusal(result: Result<ValidRequest, ApiError>) -> (u16, Value, Value, String) {
    match result {
        Ok(valid) => panic!("accepted: {:?}", valid.request()),
        Err(e) => {
            let body = e.body();
            let error = &body["error"];
            assert_eq!(error["type"], "invalid_request_error", "{body}");
            (
                e.status().as_u16(),
                error["param"].clone(),
                error["code"].clone(),
                error["message"].as_str().unwrap_or_default().to_owned(),
            )
        }
    }
}

/// Asserts a 400 naming `param` with `code` (`None`: a null code).
#[track_caller]
fn assert_400(result: Result<ValidRequest, ApiError>, param: &str, code: Option<&str>) {
    let (status, got_param, got_code, message) = refusal(result);
    assert_eq!(status, 400, "{message}");
    assert_eq!(got_param, json!(param), "{message}");
    assert_eq!(got_code, json!(code), "{message}");
}

const UNSUPPORTED: Option<&str> = Some("unsupported_parameter");
const UNRECOGNIZED: Option<&str> = Some("unrecognized_argument");
const TOO_LONG: Option<&str> = Some("context_length_exceeded");

// ---------------------------------------------------------------------------
// The body and its fields

#[test]
fn a_body_that_is_not_a_json_object_is_invalid_json() {
    let v = validator();
    for raw in [&b"not json"[..], b"", b"[]", b"{\"model\": ", b"\"text\""] {
        for result in [v.completion(raw, meta()), v.chat(raw, meta())] {
            let (status, param, code, _) = refusal(result);
            assert_eq!(
                (status, param, code),
                (400, Value::Null, json!("invalid_json"))
            );
        }
    }
}

#[test]
fn an_unknown_field_is_named() {
    assert_400(complete(json!({"foo": 1})), "foo", UNRECOGNIZED);
    assert_400(chat(json!({"foo": 1})), "foo", UNRECOGNIZED);
    // A chat-only field is unknown to completions, and the other way round.
    assert_400(
        complete(json!({"max_completion_tokens": 4})),
        "max_completion_tokens",
        UNRECOGNIZED,
    );
    assert_400(complete(json!({"messages": []})), "messages", UNRECOGNIZED);
    assert_400(chat(json!({"prompt": "x"})), "prompt", UNRECOGNIZED);
    assert_400(chat(json!({"echo": false})), "echo", UNRECOGNIZED);
}

#[test]
fn a_wrongly_typed_field_is_400_naming_it() {
    for (field, value) in [
        ("model", json!(5)),
        ("max_tokens", json!("ten")),
        ("max_tokens", json!(2.5)),
        ("temperature", json!("hot")),
        ("top_p", json!([1])),
        ("n", json!(1.5)),
        ("seed", json!("7")),
        ("stop", json!(5)),
        ("stop", json!(["a", 1])),
        ("stream", json!("yes")),
        ("user", json!(5)),
        ("ignore_eos", json!(1)),
    ] {
        assert_400(complete(json!({field: value.clone()})), field, None);
        assert_400(chat(json!({field: value})), field, None);
    }
    assert_400(complete(json!({"logprobs": true})), "logprobs", None);
    assert_400(chat(json!({"logprobs": 1})), "logprobs", None);
    assert_400(
        chat(json!({"max_completion_tokens": "4"})),
        "max_completion_tokens",
        None,
    );
}

#[test]
fn null_is_the_same_as_absent() {
    let nulls = json!({"temperature": null, "top_p": null, "n": null, "seed": null,
        "stop": null, "stream": null, "stream_options": null, "user": null,
        "ignore_eos": null, "presence_penalty": null, "frequency_penalty": null,
        "logit_bias": null, "max_tokens": null});
    let request = accepted(complete(with(
        nulls.clone(),
        json!({"logprobs": null,
        "echo": null, "best_of": null, "suffix": null}),
    )));
    assert_eq!(request.sampling, default_sampling());
    assert_eq!(request.stop.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS);
    assert_eq!(request.n, 1);
    assert_eq!(request.logprobs, None);
    let request = accepted(chat(with(
        nulls,
        json!({"max_completion_tokens": null,
        "logprobs": null, "top_logprobs": null, "tools": null, "tool_choice": null,
        "response_format": null}),
    )));
    assert_eq!(request.sampling, default_sampling());
    assert_eq!(request.logprobs, None);
    // A null prompt is a missing prompt.
    assert_400(complete(json!({"prompt": null})), "prompt", None);
    assert_400(chat(json!({"messages": null})), "messages", None);
}

/// The sampling parameters of a request that sets none.
fn default_sampling() -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        seed: None,
    }
}

#[test]
fn the_model_must_be_given_and_served() {
    assert_400(complete(json!({"model": "$remove"})), "model", None);
    assert_400(chat(json!({"model": "$remove"})), "model", None);
    for result in [
        complete(json!({"model": "other"})),
        chat(json!({"model": "other"})),
    ] {
        let (status, param, code, _) = refusal(result);
        assert_eq!(
            (status, param, code),
            (404, json!("model"), json!("model_not_found"))
        );
    }
}

// ---------------------------------------------------------------------------
// Sampling and the other shared parameters

#[test]
fn temperature_is_in_0_to_2() {
    for ok in [0.0, 0.7, 2.0] {
        let request = accepted(chat(json!({"temperature": ok})));
        assert_eq!(request.sampling.temperature, ok as f32);
    }
    for bad in [-0.5, 2.01, 3.0] {
        assert_400(complete(json!({"temperature": bad})), "temperature", None);
        assert_400(chat(json!({"temperature": bad})), "temperature", None);
    }
}

#[test]
fn top_p_is_above_0_and_at_most_1() {
    for ok in [0.01, 0.5, 1.0] {
        let request = accepted(complete(json!({"top_p": ok})));
        assert_eq!(request.sampling.top_p, ok as f32);
    }
    for bad in [0.0, -0.1, 1.5] {
        assert_400(complete(json!({"top_p": bad})), "top_p", None);
        assert_400(chat(json!({"top_p": bad})), "top_p", None);
    }
}

#[test]
fn a_seed_is_any_64_bit_integer() {
    assert_eq!(
        accepted(complete(json!({"seed": 7}))).sampling.seed,
        Some(7)
    );
    assert_eq!(
        accepted(complete(json!({"seed": -1}))).sampling.seed,
        Some(u64::MAX)
    );
}

#[test]
fn n_is_1_to_128() {
    assert_eq!(accepted(complete(json!({"n": 1}))).n, 1);
    assert_eq!(accepted(chat(json!({"n": MAX_N}))).n, 128);
    for bad in [0, -1, MAX_N + 1] {
        assert_400(complete(json!({"n": bad})), "n", None);
        assert_400(chat(json!({"n": bad})), "n", None);
    }
}

#[test]
fn stop_is_a_string_or_up_to_four_strings() {
    assert_eq!(
        accepted(complete(json!({"stop": "\n"}))).stop.stop_strings,
        vec!["\n"]
    );
    assert_eq!(
        accepted(chat(json!({"stop": ["a", "b", "c", "d"]})))
            .stop
            .stop_strings,
        vec!["a", "b", "c", "d"]
    );
    assert!(accepted(chat(json!({"stop": []})))
        .stop
        .stop_strings
        .is_empty());
    assert_400(
        complete(json!({"stop": ["a", "b", "c", "d", "e"]})),
        "stop",
        None,
    );
    assert_400(chat(json!({"stop": {"a": 1}})), "stop", None);
}

#[test]
fn stream_options_need_a_stream() {
    let valid = complete(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let valid = valid.expect("a stream with usage");
    assert!(valid.stream() && valid.include_usage());
    let valid = chat(json!({"stream": true, "stream_options": {"include_usage": null}}))
        .expect("a stream without usage");
    assert!(valid.stream() && !valid.include_usage());
    let plain = complete(json!({})).expect("a plain request");
    assert!(!plain.stream() && !plain.include_usage());
    assert_400(
        complete(json!({"stream_options": {"include_usage": true}})),
        "stream_options",
        None,
    );
    assert_400(
        chat(json!({"stream": false, "stream_options": {}})),
        "stream_options",
        None,
    );
    assert_400(
        chat(json!({"stream": true, "stream_options": true})),
        "stream_options",
        None,
    );
    assert_400(
        complete(json!({"stream": true, "stream_options": {"include_usage": "yes"}})),
        "stream_options.include_usage",
        None,
    );
    assert_400(
        chat(json!({"stream": true, "stream_options": {"foo": 1}})),
        "stream_options.foo",
        UNRECOGNIZED,
    );
}

#[test]
fn user_and_ignore_eos_are_taken() {
    let request = accepted(complete(json!({"user": "u-1", "ignore_eos": true})));
    assert!(request.stop.ignore_eos);
    assert!(!accepted(chat(json!({}))).stop.ignore_eos);
}

#[test]
fn parameters_we_do_not_implement_are_accepted_only_at_their_default() {
    for (field, default, other) in [
        ("presence_penalty", json!(0), json!(0.5)),
        ("frequency_penalty", json!(0.0), json!(-1)),
        ("logit_bias", json!({}), json!({"504": 10})),
    ] {
        accepted(complete(json!({field: default.clone()})));
        accepted(chat(json!({field: default})));
        assert_400(complete(json!({field: other.clone()})), field, UNSUPPORTED);
        assert_400(chat(json!({field: other})), field, UNSUPPORTED);
    }
    for (field, default, other) in [
        ("echo", json!(false), json!(true)),
        ("suffix", json!(""), json!("!")),
        ("best_of", json!(1), json!(2)),
    ] {
        accepted(complete(json!({field: default})));
        assert_400(complete(json!({field: other})), field, UNSUPPORTED);
    }
    // best_of equal to n is plain n.
    assert_eq!(accepted(complete(json!({"n": 3, "best_of": 3}))).n, 3);
    assert_400(
        complete(json!({"n": 2, "best_of": 3})),
        "best_of",
        UNSUPPORTED,
    );
    for field in [
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
        "parallel_tool_calls",
        "audio",
        "modalities",
        "prediction",
    ] {
        assert_400(chat(json!({field: {"type": "x"}})), field, UNSUPPORTED);
    }
}

// ---------------------------------------------------------------------------
// Log probabilities

#[test]
fn completion_logprobs_is_0_to_20() {
    assert_eq!(accepted(complete(json!({"logprobs": 0}))).logprobs, Some(0));
    assert_eq!(
        accepted(complete(json!({"logprobs": 20}))).logprobs,
        Some(20)
    );
    assert_eq!(accepted(complete(json!({}))).logprobs, None);
    for bad in [-1, 21] {
        assert_400(complete(json!({"logprobs": bad})), "logprobs", None);
    }
}

#[test]
fn chat_top_logprobs_is_0_to_20_and_needs_logprobs() {
    assert_eq!(accepted(chat(json!({"logprobs": true}))).logprobs, Some(0));
    assert_eq!(
        accepted(chat(json!({"logprobs": true, "top_logprobs": 5}))).logprobs,
        Some(5)
    );
    assert_eq!(accepted(chat(json!({"logprobs": false}))).logprobs, None);
    assert_400(
        chat(json!({"logprobs": true, "top_logprobs": 21})),
        "top_logprobs",
        None,
    );
    assert_400(
        chat(json!({"logprobs": true, "top_logprobs": -1})),
        "top_logprobs",
        None,
    );
    assert_400(chat(json!({"top_logprobs": 2})), "top_logprobs", None);
    assert_400(
        chat(json!({"logprobs": false, "top_logprobs": 2})),
        "top_logprobs",
        None,
    );
}

// ---------------------------------------------------------------------------
// max_tokens and max_completion_tokens

#[test]
fn max_tokens_is_at_least_1() {
    assert_eq!(
        accepted(complete(json!({"max_tokens": 1}))).stop.max_tokens,
        1
    );
    for bad in [0, -1] {
        assert_400(complete(json!({"max_tokens": bad})), "max_tokens", None);
        assert_400(chat(json!({"max_tokens": bad})), "max_tokens", None);
        assert_400(
            chat(json!({"max_tokens": "$remove", "max_completion_tokens": bad})),
            "max_completion_tokens",
            None,
        );
    }
}

#[test]
fn max_completion_tokens_wins_over_the_legacy_max_tokens() {
    let both = accepted(chat(json!({"max_tokens": 9, "max_completion_tokens": 5})));
    assert_eq!(both.stop.max_tokens, 5);
    let legacy = accepted(chat(json!({"max_tokens": 9})));
    assert_eq!(legacy.stop.max_tokens, 9);
    let new = accepted(chat(
        json!({"max_tokens": "$remove", "max_completion_tokens": 7}),
    ));
    assert_eq!(new.stop.max_tokens, 7);
    // Both are checked, even the one that is not used.
    assert_400(
        chat(json!({"max_tokens": 0, "max_completion_tokens": 5})),
        "max_tokens",
        None,
    );
}

// ---------------------------------------------------------------------------
// Completion prompts

#[test]
fn a_completion_prompt_is_text_or_token_ids_or_a_list_of_one() {
    let text = accepted(complete(json!({"prompt": "a bb ccc"})));
    assert_eq!(text.prompt_tokens, vec![1, 2, 3]);
    let ids = accepted(complete(json!({"prompt": [1, 2, 3]})));
    assert_eq!(ids.prompt_tokens, vec![1, 2, 3]);
    let one_text = accepted(complete(json!({"prompt": ["a bb ccc"]})));
    assert_eq!(one_text.prompt_tokens, vec![1, 2, 3]);
    let one_ids = accepted(complete(json!({"prompt": [[1, 2, 3]]})));
    assert_eq!(one_ids.prompt_tokens, vec![1, 2, 3]);
    let last_id = accepted(complete(json!({"prompt": [999]})));
    assert_eq!(last_id.prompt_tokens, vec![999]);
}

#[test]
fn bad_completion_prompts_are_the_prompts_fault() {
    assert_400(complete(json!({"prompt": "$remove"})), "prompt", None);
    // Out of the vocabulary of 1,000, negative, not an integer.
    for ids in [
        json!([1000]),
        json!([1, -1]),
        json!([1.5]),
        json!([[7, 10_000]]),
    ] {
        assert_400(complete(json!({"prompt": ids})), "prompt", None);
    }
    for several in [json!(["a", "b"]), json!([[1], [2]])] {
        assert_400(complete(json!({"prompt": several})), "prompt", UNSUPPORTED);
    }
    for wrong in [
        json!(5),
        json!({"text": "a"}),
        json!([true]),
        json!([[true]]),
    ] {
        assert_400(complete(json!({"prompt": wrong})), "prompt", None);
    }
    let tokenizer_fails = complete(json!({"prompt": format!("a {FAIL}")}));
    let (_, _, _, message) = refusal(tokenizer_fails.clone());
    assert!(message.contains("cannot tokenize"), "{message}");
    assert_400(tokenizer_fails, "prompt", None);
}

#[test]
fn an_empty_prompt_is_refused() {
    for empty in [json!(""), json!("   "), json!([]), json!([[]]), json!([""])] {
        let result = complete(json!({"prompt": empty}));
        let (_, _, _, message) = refusal(result.clone());
        assert!(message.contains("empty"), "{message}");
        assert_400(result, "prompt", None);
    }
}

// ---------------------------------------------------------------------------
// Chat messages

#[test]
fn chat_messages_become_the_templates_tokens() {
    let request = accepted(chat(json!({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": "hello", "unknown_but_null": null},
    ]})));
    let (system, user, assistant) = (
        role_token("system"),
        role_token("user"),
        role_token("assistant"),
    );
    assert_eq!(
        request.prompt_tokens,
        vec![system, 2, 5, user, 2, assistant, 5, assistant]
    );
    // "developer" is the system role; text parts join into one content.
    let developer = accepted(chat(json!({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be "},
            {"type": "text", "text": "brief"}]},
    ]})));
    assert_eq!(developer.prompt_tokens, vec![system, 2, 5, assistant]);
}

#[test]
fn bad_chat_messages_name_the_message_at_fault() {
    assert_400(chat(json!({"messages": "$remove"})), "messages", None);
    assert_400(chat(json!({"messages": "hello"})), "messages", None);
    assert_400(chat(json!({"messages": []})), "messages", None);
    assert_400(chat(json!({"messages": ["hello"]})), "messages.[0]", None);
    let user = json!({"role": "user", "content": "hi"});
    for (message, param, code) in [
        (
            json!({"role": "robot", "content": "hi"}),
            "messages.[1].role",
            UNSUPPORTED,
        ),
        (
            json!({"role": "tool", "content": "hi"}),
            "messages.[1].role",
            UNSUPPORTED,
        ),
        (json!({"content": "hi"}), "messages.[1].role", None),
        (
            json!({"role": 1, "content": "hi"}),
            "messages.[1].role",
            None,
        ),
        (json!({"role": "user"}), "messages.[1].content", None),
        (
            json!({"role": "user", "content": 5}),
            "messages.[1].content",
            None,
        ),
        (
            json!({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}),
            "messages.[1].content",
            UNSUPPORTED,
        ),
        (
            json!({"role": "user", "content": [{"type": "text"}]}),
            "messages.[1].content",
            None,
        ),
        (
            json!({"role": "user", "content": "hi", "tool_calls": []}),
            "messages.[1].tool_calls",
            UNRECOGNIZED,
        ),
    ] {
        let messages = json!([user.clone(), message]);
        assert_400(chat(json!({"messages": messages})), param, code);
    }
    let template_fails = chat(json!({"messages": [{"role": "user", "content": FAIL}]}));
    let (_, _, _, message) = refusal(template_fails.clone());
    assert!(message.contains("chat template"), "{message}");
    assert_400(template_fails, "messages", None);
}

// ---------------------------------------------------------------------------
// Lengths: the model's sequence limit

fn words(n: usize) -> String {
    vec!["w"; n].join(" ")
}

/// A chat of one user message that makes `n` prompt tokens.
fn chat_of(n: usize) -> Value {
    json!([{"role": "user", "content": words(n - 2)}])
}

#[test]
fn a_prompt_that_alone_fills_the_context_is_the_prompts_fault() {
    for (prompt, max_tokens) in [
        (CONTEXT, json!(4)),
        (CONTEXT + 10, json!(4)),
        (CONTEXT, json!(null)),
    ] {
        let result = complete(json!({"prompt": words(prompt), "max_tokens": max_tokens.clone()}));
        let (_, _, _, message) = refusal(result.clone());
        assert!(message.contains(&format!("{CONTEXT} tokens")), "{message}");
        assert!(message.contains(&format!("{prompt} tokens")), "{message}");
        if max_tokens.is_number() {
            assert!(message.contains("'max_tokens' asks for 4"), "{message}");
        }
        assert_400(result, "prompt", TOO_LONG);
        let result = chat(json!({"messages": chat_of(prompt), "max_tokens": max_tokens}));
        assert_400(result, "messages", TOO_LONG);
    }
    // Also with a chat's max_completion_tokens, and with token ids.
    assert_400(
        chat(
            json!({"messages": chat_of(CONTEXT + 1), "max_tokens": "$remove",
            "max_completion_tokens": 1}),
        ),
        "messages",
        TOO_LONG,
    );
    assert_400(
        complete(json!({"prompt": vec![5; CONTEXT + 1]})),
        "prompt",
        TOO_LONG,
    );
}

#[test]
fn a_prompt_that_fits_with_too_many_output_tokens_is_max_tokens_fault() {
    let result = complete(json!({"prompt": words(60), "max_tokens": 5}));
    let (_, _, _, message) = refusal(result.clone());
    for number in [
        "64 tokens",
        "65 tokens",
        "60 in the prompt",
        "5 in 'max_tokens'",
        "at most 4",
    ] {
        assert!(message.contains(number), "{number}: {message}");
    }
    assert_400(result, "max_tokens", TOO_LONG);
    assert_400(
        chat(json!({"messages": chat_of(60), "max_tokens": 5})),
        "max_tokens",
        TOO_LONG,
    );
    let result = chat(json!({"messages": chat_of(60), "max_tokens": "$remove",
        "max_completion_tokens": 5}));
    let (_, _, _, message) = refusal(result.clone());
    assert!(message.contains("60 in the messages"), "{message}");
    assert_400(result, "max_completion_tokens", TOO_LONG);
    // A huge max_tokens is refused, not overflowed.
    assert_400(
        complete(json!({"max_tokens": i64::MAX})),
        "max_tokens",
        TOO_LONG,
    );
}

#[test]
fn prompt_and_max_tokens_may_fill_the_context_exactly() {
    let request = accepted(complete(json!({"prompt": words(60), "max_tokens": 4})));
    assert_eq!(
        request.prompt_tokens.len() + request.stop.max_tokens,
        CONTEXT
    );
    let request = accepted(chat(
        json!({"messages": chat_of(CONTEXT - 1), "max_tokens": 1}),
    ));
    assert_eq!(request.stop.max_tokens, 1);
}

#[test]
fn without_max_tokens_a_chat_gets_the_rest_of_the_context() {
    let request = accepted(chat(json!({"max_tokens": "$remove"})));
    assert_eq!(request.stop.max_tokens, CONTEXT - 3);
    let request = accepted(chat(
        json!({"messages": chat_of(CONTEXT - 1), "max_tokens": "$remove"}),
    ));
    assert_eq!(request.stop.max_tokens, 1);
}

#[test]
fn without_max_tokens_a_completion_gets_16_or_what_room_is_left() {
    let request = accepted(complete(json!({"max_tokens": "$remove"})));
    assert_eq!(request.stop.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS);
    let request = accepted(complete(
        json!({"prompt": words(CONTEXT - 5), "max_tokens": "$remove"}),
    ));
    assert_eq!(request.stop.max_tokens, 5);
}

#[test]
fn a_small_kv_cache_is_the_sequence_limit() {
    let v = validator_with(32, Limits::default());
    let request = accepted(chat_on(&v, json!({"max_tokens": "$remove"})));
    assert_eq!(request.stop.max_tokens, 32 - 3);
    let result = complete_on(&v, json!({"prompt": words(32)}));
    let (_, _, _, message) = refusal(result.clone());
    assert!(
        message.contains("at most 32 tokens per sequence"),
        "{message}"
    );
    assert!(message.contains("context length is 64"), "{message}");
    assert_400(result, "prompt", TOO_LONG);
    assert_400(
        complete_on(&v, json!({"prompt": words(30), "max_tokens": 3})),
        "max_tokens",
        TOO_LONG,
    );
    accepted(complete_on(
        &v,
        json!({"prompt": words(30), "max_tokens": 2}),
    ));
}

// ---------------------------------------------------------------------------
// Lengths: the server's limits

fn limits(max_prompt_tokens: Option<usize>, max_output_tokens: Option<usize>) -> Limits {
    Limits {
        max_prompt_tokens,
        max_output_tokens,
        ..Limits::default()
    }
}

#[test]
fn max_prompt_tokens_limits_the_prompt() {
    let v = validator_with(CONTEXT, limits(Some(10), None));
    accepted(complete_on(&v, json!({"prompt": words(10)})));
    accepted(chat_on(&v, json!({"messages": chat_of(10)})));
    let result = complete_on(&v, json!({"prompt": words(11)}));
    let (_, _, _, message) = refusal(result.clone());
    assert!(
        message.contains("11 tokens") && message.contains("at most 10"),
        "{message}"
    );
    assert_400(result, "prompt", None);
    assert_400(
        chat_on(&v, json!({"messages": chat_of(11)})),
        "messages",
        None,
    );
    // Past the context, the context's error comes first.
    assert_400(
        complete_on(&v, json!({"prompt": words(CONTEXT)})),
        "prompt",
        TOO_LONG,
    );
}

#[test]
fn max_output_tokens_limits_what_is_asked_and_what_is_given() {
    let v = validator_with(CONTEXT, limits(None, Some(8)));
    assert_eq!(
        accepted(complete_on(&v, json!({"max_tokens": 8})))
            .stop
            .max_tokens,
        8
    );
    let result = complete_on(&v, json!({"max_tokens": 9}));
    let (_, _, _, message) = refusal(result.clone());
    assert!(
        message.contains("9") && message.contains("at most 8"),
        "{message}"
    );
    assert_400(result, "max_tokens", None);
    assert_400(chat_on(&v, json!({"max_tokens": 9})), "max_tokens", None);
    assert_400(
        chat_on(
            &v,
            json!({"max_tokens": "$remove", "max_completion_tokens": 9}),
        ),
        "max_completion_tokens",
        None,
    );
    // Asking for nothing is never refused: the default is cut to the limit.
    let chat_default = accepted(chat_on(&v, json!({"max_tokens": "$remove"})));
    assert_eq!(chat_default.stop.max_tokens, 8);
    let completion_default = accepted(complete_on(&v, json!({"max_tokens": "$remove"})));
    assert_eq!(completion_default.stop.max_tokens, 8);
}

// ---------------------------------------------------------------------------
// The request the engine gets

#[test]
fn the_valid_request_is_the_engines_request_with_the_handlers_facts() {
    let valid = validator()
        .validate(
            crate::openai::Endpoint::Completions,
            completion_body(json!({"temperature": 0, "seed": 3, "stop": "x", "n": 2,
                "logprobs": 1, "ignore_eos": true}))
            .to_string()
            .as_bytes(),
            meta(),
        )
        .expect("valid");
    assert!(!valid.stream());
    let request = valid.into_request();
    let expected = meta();
    assert_eq!(request.id, expected.id);
    assert_eq!(request.caller, expected.caller);
    assert_eq!(request.arrived_at, expected.arrived_at);
    assert_eq!(request.model, MODEL);
    assert_eq!(request.prompt_tokens, vec![5, 5]);
    assert_eq!(
        request.sampling,
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: Some(3)
        }
    );
    assert_eq!(
        request.stop,
        StopConditions {
            max_tokens: 4,
            stop_strings: vec!["x".to_owned()],
            ignore_eos: true,
        }
    );
    assert_eq!((request.n, request.logprobs), (2, Some(1)));
    let chat = validator()
        .validate(
            crate::openai::Endpoint::Chat,
            chat_body(json!({})).to_string().as_bytes(),
            meta(),
        )
        .expect("valid chat");
    assert_eq!(chat.request().prompt_tokens.len(), 3);
}
