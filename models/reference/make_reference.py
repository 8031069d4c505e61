#!/usr/bin/env python3
"""Reference data for SmolLM2-135M-Instruct (Q4_1 GGUF) from llama.cpp.

Runs the model through llama-cpp-python, an implementation independent of
tokenmill, and writes a JSON fixture with:

  * tokenization of a set of tricky strings (special tokens parsed),
  * greedy continuations of a set of prompts, with the top-1/top-2 logit
    margin at every step, so a consumer knows up to which step greedy
    agreement can be expected.

See models/reference/README.md for how to set up the environment and what the
fields mean. Usage:

    python models/reference/make_reference.py [--model PATH] [--out PATH]
"""

import argparse
import hashlib
import json
import os
import platform
import sys

import numpy as np

import llama_cpp
from llama_cpp import Llama

EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Settings for every Llama instance; recorded in the output.
N_CTX = 2048
N_THREADS = 2
N_BATCH = 512
SEED = 0
MAX_NEW_TOKENS = 32
MARGIN_DECIMALS = 4

# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

TOKENIZATION_TEXTS = [
    "",
    " ",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "  two leading and two trailing  ",
    "a  b   c    d",
    "tab\tseparated\t\tvalues",
    "line one\nline two\n\nline four\n",
    "  \n\n  ",
    "\n",
    "\t\t\n \t",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber Stra\u00dfe \u00c5ngstr\u00f6m",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u6211\u559c\u6b22\u5b66\u4e60\u673a\u5668\u5b66\u4e60\u3002",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "Emoji: \U0001f600\U0001f680\u2764\ufe0f",
    "Family \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 and thumbs \U0001f44d\U0001f3fd",
    "Flags \U0001f1eb\U0001f1f7\U0001f1ef\U0001f1f5\U0001f1fa\U0001f1f8",
    "1234567890",
    "12345678901234567890 and 007",
    "3.14159 2.71828 -0.5 1e-9 1,000,000",
    "$19.99 + 5% = 20.99 (approx)",
    "def add(a, b):\n    return a + b\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    for x in &v {\n        println!(\"{x}\");\n    }\n}\n",
    "https://example.com/path/to/page?query=1&lang=en#section",
    "user@example.org said: see http://www.test.co.uk/",
    "don't I'll we've they're it's can't SHE'S",
    "CamelCaseWord snake_case_word SCREAMING_CASE mIxEd CaSe",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|><|endoftext|>",
    "a <|im_start |> b (not a special token)",
]

# Strings that contain special-token text: also tokenized with special=False,
# i.e. as plain text (what a server must do with user content so that a user
# cannot inject control tokens).
PLAIN_TOKENIZATION_TEXTS = [t for t in TOKENIZATION_TEXTS if "<|" in t]

LONG_PARAGRAPH = (
    "The history of the printing press is a story of gradual refinement rather "
    "than sudden invention. Long before Johannes Gutenberg built his press in "
    "Mainz around 1440, craftsmen in China and Korea had carved wooden blocks "
    "and cast metal type. What Gutenberg contributed was a practical system: an "
    "adjustable mould for casting uniform letters in large numbers, an oil-based "
    "ink that clung to metal, and a screw press adapted from those used to make "
    "wine. Within fifty years, printing shops had spread to more than two hundred "
    "European cities, and millions of books were in circulation. Scholars argue "
    "about the consequences, but most agree that cheap books changed how ideas "
    "travelled. In summary, the most important effect of the printing press was"
)

CHAT_MESSAGES = [
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
]

PROMPTS = [
    ("prose", "Once upon a time, in a small village at the edge of a forest, there lived"),
    ("code_python", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
    ("code_rust", "fn main() {\n    let numbers = vec![1, 2, 3, 4, 5];\n    let sum: i32 ="),
    ("arithmetic", "Question: What is 12 + 35?\nAnswer: 12 + 35 = 47\nQuestion: What is 23 + 19?\nAnswer:"),
    ("numbers", "1, 2, 3, 4, 5, 6, 7, 8,"),
    ("unicode", "Caf\u00e9, cr\u00e8me br\u00fbl\u00e9e and \u00fcber-cool \U0001f600 emoji: the French word for"),
    ("list", "Here is a shopping list:\n1. Milk\n2. Eggs\n3."),
    ("question", "Q: Why is the sky blue?\nA:"),
    # A bare question: the model's first choice is to end the turn, so this
    # checks that an end-of-generation token wins the argmax.
    ("question_eog", "Why is the sky blue?"),
    ("chat", None),  # rendered from CHAT_MESSAGES with the GGUF chat template
    ("long_paragraph", LONG_PARAGRAPH),
    ("single_token", "The"),
]

# The prompt also checked against llm.create_completion / llm.generate.
CROSSCHECK_PROMPT = "prose"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def default_model_path():
    cache = os.environ.get("TOKENMILL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tokenmill"
    )
    return os.path.join(cache, "models", MODEL_NAME)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(model_path):
    return Llama(
        model_path=model_path,
        n_ctx=N_CTX,
        logits_all=True,
        n_threads=N_THREADS,
        n_batch=N_BATCH,
        seed=SEED,
        verbose=False,
    )


def eog_checker(llm):
    """A function token -> is end-of-generation, as llama.cpp decides it."""
    model = llm.model  # llama_model_p
    if hasattr(llama_cpp, "llama_model_get_vocab") and hasattr(llama_cpp, "llama_vocab_is_eog"):
        vocab = llama_cpp.llama_model_get_vocab(model)
        return lambda t: bool(llama_cpp.llama_vocab_is_eog(vocab, t))
    if hasattr(llama_cpp, "llama_token_is_eog"):  # older API
        return lambda t: bool(llama_cpp.llama_token_is_eog(model, t))
    eos = llm.token_eos()
    return lambda t: t == eos


def render_chat(llm, messages):
    """Render messages with the GGUF's own chat template.

    Uses llama-cpp-python's Jinja2ChatFormatter (what its server uses) and
    checks the result against plain jinja2.
    """
    import jinja2
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata["tokenizer.chat_template"]
    fmt = Jinja2ChatFormatter(
        template=template,
        eos_token=llm.detokenize([llm.token_eos()], special=True).decode("utf-8"),
        bos_token=llm.detokenize([llm.token_bos()], special=True).decode("utf-8"),
        add_generation_prompt=True,
    )
    rendered = fmt(messages=messages).prompt
    direct = jinja2.Environment(loader=jinja2.BaseLoader()).from_string(template).render(
        messages=messages, add_generation_prompt=True
    )
    if rendered != direct:
        raise SystemExit(f"chat template renderings differ: {rendered!r} vs {direct!r}")
    return template, rendered


def last_logits(llm):
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)


def greedy(llm, prompt_ids, is_eog):
    llm.reset()
    llm.eval(prompt_ids)
    cont, margins, top1 = [], [], []
    eog_id = None
    for _ in range(MAX_NEW_TOKENS):
        logits = last_logits(llm)
        order = np.argsort(-logits, kind="stable")
        best, second = int(order[0]), int(order[1])
        margins.append(round(float(logits[best] - logits[second]), MARGIN_DECIMALS))
        top1.append(round(float(logits[best]), MARGIN_DECIMALS))
        if is_eog(best):
            eog_id = best
            break
        cont.append(best)
        llm.eval([best])
    return cont, margins, top1, eog_id


def teacher_forced(llm, prompt_ids, cont, n_steps):
    """Evaluate prompt + continuation in one batch (as a consumer does) and
    return llama.cpp's own argmax and top-1/top-2 margin at every step."""
    llm.reset()
    llm.eval(prompt_ids + cont)
    n = len(prompt_ids)
    argmax, margins = [], []
    for i in range(n_steps):
        row = np.array(llm.scores[n - 1 + i], dtype=np.float32)
        order = np.argsort(-row, kind="stable")
        argmax.append(int(order[0]))
        margins.append(round(float(row[order[0]] - row[order[1]]), MARGIN_DECIMALS))
    return argmax, margins


def crosscheck(llm, prompt_ids, cont, margins, is_eog):
    """Compare our loop with llama-cpp-python's own sampling paths."""
    result = {}
    # 1. llm.generate: yields token ids directly.
    llm.reset()
    gen_ids = []
    for tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                            repeat_penalty=1.0, reset=True):
        if is_eog(tok) or len(gen_ids) >= MAX_NEW_TOKENS:
            break
        gen_ids.append(int(tok))
    # 2. create_completion: returns text; compare with our detokenized tokens.
    llm.reset()
    out = llm.create_completion(prompt=prompt_ids, max_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=SEED)
    cc_text = out["choices"][0]["text"]
    ours_text = llm.detokenize(cont).decode("utf-8", errors="replace")

    first_small = next((i for i, m in enumerate(margins) if m < 0.5), len(margins))
    agree = 0
    while agree < min(len(gen_ids), len(cont)) and gen_ids[agree] == cont[agree]:
        agree += 1
    result["generate_ids"] = gen_ids
    result["generate_agree_prefix"] = agree
    result["generate_identical"] = gen_ids == cont
    result["create_completion_text"] = cc_text
    result["create_completion_identical_text"] = cc_text == ours_text
    result["create_completion_finish_reason"] = out["choices"][0]["finish_reason"]
    result["first_small_margin_step"] = first_small
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model_path(), help="path to the .gguf (default: %(default)s)")
    ap.add_argument("--out", default="tests/fixtures/smollm2_reference.json", help="output JSON (default: %(default)s)")
    args = ap.parse_args()

    sha = sha256_of(args.model)
    if sha != EXPECTED_SHA256:
        print(f"warning: sha256 {sha} differs from the expected {EXPECTED_SHA256}", file=sys.stderr)

    llm = load(args.model)
    is_eog = eog_checker(llm)
    n_vocab = llm.n_vocab()
    eog_ids = [t for t in range(n_vocab) if is_eog(t)]

    # --- tokenization ---------------------------------------------------
    def tok(text, special=True):
        return [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)]

    tokenization, problems = [], []
    for text in TOKENIZATION_TEXTS:
        ids = tok(text)
        back = llm.detokenize(ids, special=True).decode("utf-8", errors="replace")
        if back != text:
            problems.append(f"round trip differs for {text!r}: {back!r}")
        tokenization.append({"text": text, "ids": ids})
    plain = [{"text": t, "ids": tok(t, special=False)} for t in PLAIN_TOKENIZATION_TEXTS]

    # --- prompts --------------------------------------------------------
    template, chat_text = render_chat(llm, CHAT_MESSAGES)
    prompts, cross = [], None
    for name, text in PROMPTS:
        entry = {"name": name}
        if text is None:
            text = chat_text
            entry["chat_messages"] = CHAT_MESSAGES
        ids = tok(text)
        cont, margins, top1, eog_id = greedy(llm, ids, is_eog)
        tf_argmax, tf_margins = teacher_forced(llm, ids, cont, len(margins))
        entry.update(
            text=text,
            prompt_ids=ids,
            continuation_ids=cont,
            continuation_text=llm.detokenize(cont).decode("utf-8", errors="replace"),
            margins=margins,
            top1_logits=top1,
            stopped_by_eog=eog_id is not None,
            eog_id=eog_id,
            teacher_forced_argmax=tf_argmax,
            teacher_forced_margins=tf_margins,
        )
        prompts.append(entry)
        if name == CROSSCHECK_PROMPT:
            cross = {"prompt": name, **crosscheck(llm, ids, cont, margins, is_eog)}

    # --- determinism check: a fresh instance gives the same first prompt ---
    llm2 = load(args.model)
    p0 = prompts[0]
    c2, m2, _, _ = greedy(llm2, p0["prompt_ids"], is_eog)
    rerun_identical = c2 == p0["continuation_ids"] and m2 == p0["margins"]
    del llm2

    doc = {
        "generator": {
            "tool": "llama-cpp-python",
            "script": "models/reference/make_reference.py",
            "llama_cpp_version": llama_cpp.__version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "model_file": os.path.basename(args.model),
            "model_sha256": sha,
            "n_ctx": N_CTX,
            "n_threads": N_THREADS,
            "n_batch": N_BATCH,
            "seed": SEED,
            "logits_all": True,
            "max_new_tokens": MAX_NEW_TOKENS,
            "margin_decimals": MARGIN_DECIMALS,
            "tokenize": "llm.tokenize(text.encode('utf-8'), add_bos=False, special=True)",
            "decoding": "greedy argmax over raw logits, no penalties; prompt evaluated in one batch, then one token per eval",
        },
        "model": {
            "n_vocab": n_vocab,
            "bos_id": int(llm.token_bos()),
            "eos_id": int(llm.token_eos()),
            "eog_ids": eog_ids,
            "chat_template": template,
        },
        "tokenization": tokenization,
        "tokenization_plain": plain,
        "prompts": prompts,
        "crosscheck": cross,
        "rerun_identical": rerun_identical,
    }

    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")

    # --- summary ----------------------------------------------------------
    print(f"llama_cpp {llama_cpp.__version__}; model sha256 {sha}")
    print(f"eog ids: {eog_ids}")
    print(f"{len(tokenization)} tokenization strings, {len(plain)} plain; round-trip problems: {len(problems)}")
    for p in problems:
        print("  " + p)
    print(f"{'name':16} {'prompt':>6} {'cont':>4} {'eog':>5} {'min_margin':>10} {'first<0.5':>9} "
          f"{'tf_agree':>8} {'tf_flip_margins':>16} {'max|dmargin|':>12}")
    worst_dm = 0.0
    for p in prompts:
        m = p["margins"]
        first_small = next((i for i, x in enumerate(m) if x < 0.5), None)
        want = p["continuation_ids"] + ([p["eog_id"]] if p["stopped_by_eog"] else [])
        flips = [m[i] for i, (a, b) in enumerate(zip(p["teacher_forced_argmax"], want)) if a != b]
        dm = max(abs(a - b) for a, b in zip(m, p["teacher_forced_margins"]))
        worst_dm = max(worst_dm, dm)
        print(f"{p['name']:16} {len(p['prompt_ids']):6} {len(p['continuation_ids']):4} "
              f"{str(p['eog_id']):>5} {min(m):10.4f} {str(first_small):>9} "
              f"{len(m) - len(flips):4}/{len(m):<3} {str(flips):>16} {dm:12.4f}")
    print(f"largest |margin - teacher_forced_margin|: {worst_dm:.4f}")
    print("crosscheck:", json.dumps({k: v for k, v in cross.items() if k not in ("generate_ids",)}, ensure_ascii=False))
    print("rerun identical:", rerun_identical)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
