"""Check GGUF files against the merged model, in the runtimes people load them in.

Entry point: `verify_gguf(files, merged_dir, ...) -> list[GGUFVerification]`. The merged
model under transformers (float32) is the reference, on fixed inputs: the recipe's sample
prompts and a few of the run's conversations. In llama.cpp (llama-cpp-python):

- greedy replies to the sample prompts: f32/f16 files must reproduce the first N tokens (up
  to the end-of-turn token). Where the merged model's two best tokens are closer than the file's
  own rounding moves such a gap (measured on the conversations below: `rounding_gap_shift`),
  llama.cpp may pick the other one; that position is reported as a near-tie and the check goes
  on from the merged model's token. Any other difference fails;
- top-1 agreement on every position of the conversations (teacher-forced);
- a chat completion through the GGUF's *own* chat template must end by itself, at the
  end-of-turn token, wherever the merged model ends its reply within the same budget (within
  twice the merged model's reply length plus 16 tokens);
- llama.cpp's tokenizer must encode the rendered prompts exactly as the training tokenizer.

llama.cpp must also read the training chat template, EOS and EOT from the file. Then
transformers' GGUF loader reads one file back (logits against the merged model), reported next
to llama.cpp's; where llama-cpp-python is not installed it reads back every file and its
tokenizer (chat template and EOS), binding: then it is the only check, and says so.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmtune.console import console

EXACT_TYPES = ("f32", "f16")  # must reproduce greedy replies token for token
BOUND_TYPES = ("f32", "f16", "q8_0")  # bound by the agreement limit and the stop check


@dataclass
class Reference:
    """What the merged model does on the fixed inputs."""

    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    replies: list[list[int]]  # greedy, up to and including end-of-turn (or the budget)
    margins: list[list[float]]  # per reply token: the merged model's top-1 minus top-2 logit there
    conversation_ids: list[list[int]]
    conversation_texts: list[str]
    logits: list  # per conversation, [positions, vocab] float32 numpy
    end_of_turn: int
    budget: int


@dataclass
class GGUFVerification:
    file: str
    type: str
    runtime: str | None  # "llama.cpp via llama-cpp-python X" or None when not installed
    greedy_tokens_matched: list[int] | None = None  # equal, or a near-tie decided by rounding (greedy_ties)
    greedy_tokens_compared: list[int] | None = None
    greedy_tokens_identical: list[int] | None = None  # before the first token that differs at all
    greedy_ties: list[list[dict]] | None = None  # per prompt: where the file picked the other of two near-tied tokens
    rounding_gap_shift: float | None = None  # the most the file moves the merged model's top-2 gap (conversations)
    top1_agreement: float | None = None
    positions: int | None = None
    stops_at_end_of_turn: list[bool | None] | None = None  # None: the merged model ran past the budget too
    reply_text: list[str] | None = None
    tokenizer_matches: bool | None = None
    template_prompt_matches: bool | None = None  # the GGUF's template, rendered by llama-cpp-python, gives the training prompt
    metadata_matches: bool | None = None  # chat template, EOS and EOT as llama.cpp reads them
    readback: dict | None = None  # transformers' GGUF loader
    seconds: float | None = None  # this file's llama.cpp checks
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def chat_ids(tokenizer, chat: list[dict], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(chat, add_generation_prompt=generation_prompt, return_dict=True)["input_ids"])


def reference(merged_dir: Path, tokenizer, prompts: list[list[dict]], conversations: list[list[dict]],
              end_of_turn: int, budget: int) -> Reference:
    import torch
    from transformers import AutoModelForCausalLM

    from llmtune.models import device_type

    device = device_type()
    kwargs = {"device_map": "auto"} if device == "cuda" else {}
    # float32 so the reference is the merged weights themselves, not a 16-bit rounding of them.
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, **kwargs).eval()
    dev = next(model.parameters()).device

    prompt_ids = [chat_ids(tokenizer, c, generation_prompt=True) for c in prompts]
    conv_ids = [chat_ids(tokenizer, c, generation_prompt=False) for c in conversations]
    replies, margins, logits = [], [], []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids], device=dev)
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=budget, do_sample=False,
                                 eos_token_id=end_of_turn, pad_token_id=end_of_turn, output_logits=True,
                                 return_dict_in_generate=True)
            out = gen.sequences[0, len(ids):].tolist()
            reply = out[: out.index(end_of_turn) + 1] if end_of_turn in out else out
            replies.append(reply)
            top2 = [step[0].float().topk(2).values for step in gen.logits[: len(reply)]]
            margins.append([float(t[0] - t[1]) for t in top2])
        for ids in conv_ids:
            logits.append(model(torch.tensor([ids], device=dev), use_cache=False).logits[0].float().cpu().numpy())
    del model
    return Reference(
        prompt_ids, [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in prompts],
        replies, margins, conv_ids, [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations],
        logits, end_of_turn, budget,
    )


def _top1(reference_logits: list, candidate_logits: list) -> tuple[float, int, float]:
    import numpy as np

    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference_logits, candidate_logits))
    total = sum(a.shape[0] for a in reference_logits)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(reference_logits, candidate_logits))
    return same / total, total, diff


def _gap_shift(reference_logits: list, candidate_logits: list) -> float:
    """How far the file moves the gap between the merged model's two best tokens, at most, over
    every teacher-forced position: the size of a near-tie its rounding can decide."""
    import numpy as np

    worst = 0.0
    for a, b in zip(reference_logits, candidate_logits):
        top2 = np.argpartition(-a, 1, axis=-1)[:, :2]
        gap_a = np.take_along_axis(a, top2, -1) @ np.array([1.0, -1.0])
        gap_b = np.take_along_axis(b, top2, -1) @ np.array([1.0, -1.0])
        worst = max(worst, float(np.abs(gap_a - gap_b).max()))
    return worst


def compare_greedy(want: list[int], margins: list[float], tie_bound: float, end_of_turn: int,
                   next_token, feed) -> tuple[int, int, list[dict]]:
    """Walk the merged model's greedy reply `want` in a runtime (`next_token()`: its argmax now;
    `feed(t)`: append t). Returns (tokens equal or near-tied, tokens before the first difference
    of any kind, the near-ties). A difference where the merged model's top-2 gap is at most
    `tie_bound` is a near-tie: recorded, and the walk goes on from the merged model's token; any
    other difference ends the walk."""
    same, first_difference, ties = 0, None, []
    for i, expected in enumerate(want):
        if next_token() != expected:
            first_difference = i if first_difference is None else first_difference
            if margins[i] > tie_bound:
                break
            ties.append({"token": i + 1, "merged_margin": margins[i]})
        same += 1
        if expected == end_of_turn:
            break
        feed(expected)
    return same, same if first_difference is None else first_difference, ties


def _gguf_formatter(llm, chat_template: str):
    """The formatter llama-cpp-python's chat completions use for a GGUF's template (its
    `chat_template.default`), built the same way from the file's own tokens."""
    from llama_cpp import llama_chat_format

    def text(token: int) -> str:
        return llm._model.token_get_text(token) if token != -1 else ""

    return llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata.get("tokenizer.chat_template", chat_template), eos_token=text(llm.token_eos()),
        bos_token=text(llm.token_bos()), stop_token_ids=[llm.token_eos()])


def check_in_llama_cpp(path: Path, outtype: str, ref: Reference, greedy_tokens: int, threads: int,
                       messages: list[list[dict]], chat_template: str) -> GGUFVerification:
    import llama_cpp
    import numpy as np

    result = GGUFVerification(path.name, outtype, f"llama.cpp via llama-cpp-python {llama_cpp.__version__}")
    longest = max(len(i) for i in ref.prompt_ids + ref.conversation_ids)
    llm = llama_cpp.Llama(
        str(path), n_ctx=2 ** math.ceil(math.log2(longest + ref.budget + 8)), n_batch=512, n_threads=threads,
        logits_all=True, verbose=False, chat_format="chat_template.default",  # the GGUF's own template
    )
    try:
        meta = llm.metadata
        result.metadata_matches = (
            meta.get("tokenizer.chat_template") == chat_template and llm.token_eos() == ref.end_of_turn
            and meta.get("tokenizer.ggml.eot_token_id") == str(ref.end_of_turn)
        )
        # The tokenizer: the rendered training prompts, special tokens parsed, no BOS added on top.
        result.tokenizer_matches = all(
            llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids
            for text, ids in zip(ref.prompt_texts + ref.conversation_texts, ref.prompt_ids + ref.conversation_ids)
        )
        logits = []
        for ids in ref.conversation_ids:
            llm.reset()
            llm.eval(ids)
            logits.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        result.top1_agreement, result.positions, _ = _top1(ref.logits, logits)
        result.rounding_gap_shift = _gap_shift(ref.logits, logits)
        # The GGUF's own chat template, rendered as llama-cpp-python's chat completions render it,
        # must give the training prompt token for token.
        formatter = _gguf_formatter(llm, chat_template)
        result.template_prompt_matches = all(
            llm.tokenize(formatter(messages=chat).prompt.encode("utf-8"), add_bos=False, special=True) == ids
            for chat, ids in zip(messages, ref.prompt_ids))
        # Greedy: walk the merged model's reply; its first `greedy_tokens` are the equality check.
        # Where the file is identical so far, the walk goes on to the reply's end-of-turn: reaching
        # it on the file's own argmax at every step is the file stopping there by itself. Only
        # where it does not is a reply generated freely through the template to see where it ends.
        matched, identical, compared, ties, stops, texts = [], [], [], [], [], []
        eot_text = llm._model.token_get_text(ref.end_of_turn)

        def next_token() -> int:
            return int(np.argmax(llm.scores[llm.n_tokens - 1]))

        def feed(token: int) -> None:
            llm.eval([token])

        for chat, ids, reply, margins in zip(messages, ref.prompt_ids, ref.replies, ref.margins):
            want = reply[:greedy_tokens]
            llm.reset()
            llm.eval(ids)
            same, first_difference, prompt_ties = compare_greedy(
                want, margins, result.rounding_gap_shift, ref.end_of_turn, next_token, feed)
            matched.append(same)
            identical.append(first_difference)
            compared.append(len(want))
            ties.append(prompt_ties)
            merged_stops = bool(reply) and reply[-1] == ref.end_of_turn
            walked = first_difference
            if merged_stops and walked == len(want) < len(reply):  # identical so far: on to end-of-turn, exactly
                walked += compare_greedy(reply[len(want):], margins[len(want):], -math.inf, ref.end_of_turn,
                                         next_token, feed)[1]
            if merged_stops and walked == len(reply):
                stops.append(True)
                texts.append(llm.detokenize(reply[:-1]).decode("utf-8", errors="replace"))
                continue
            # Where the merged model ends its reply, the file gets twice that length (and 16 more
            # tokens) to end its own, which may differ: decoding past that would only cost time.
            budget = min(ref.budget, 2 * len(reply) + 16) if merged_stops else ref.budget
            out = llm.create_chat_completion(messages=chat, max_tokens=budget, temperature=0.0, top_k=1,
                                             top_p=1.0, min_p=0.0, repeat_penalty=1.0)
            choice = out["choices"][0]
            text = choice["message"]["content"] or ""
            texts.append(text)
            ended = choice["finish_reason"] == "stop" and eot_text not in text
            stops.append(ended if merged_stops else (ended or None))
        result.greedy_tokens_matched, result.greedy_tokens_compared = matched, compared
        result.greedy_tokens_identical, result.greedy_ties = identical, ties
        result.stops_at_end_of_turn, result.reply_text = stops, texts
    finally:
        llm.close()
    return result


def read_back_logits(path: str, conversation_ids: list[list[int]], out: str) -> str:
    """transformers' GGUF loader: the file's weights, dequantized, and their logits on the
    conversations, saved to `out` (.npy). Returns an error message, or "" when it read the file."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    p = Path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    except (NotImplementedError, ValueError, KeyError) as exc:  # e.g. it maps a `llama` file named "mistral..." to an arch gguf-py lacks
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    with torch.no_grad():
        logits = [model(torch.tensor([ids]), use_cache=False).logits[0].numpy() for ids in conversation_ids]
    np.save(out, np.concatenate(logits))
    return ""


def _start_read_back(paths: list[Path], conversation_ids: list[list[int]]) -> subprocess.Popen:
    """`read_back_logits` for each file in a separate process (`python -m llmtune.export.gguf_verify`),
    one torch thread, so it runs beside this process's llama.cpp checks."""
    job = paths[0].with_name(".readback-job.json")
    job.write_text(json.dumps({"files": [str(p) for p in paths], "conversation_ids": conversation_ids}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmtune.export.gguf_verify", str(job)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish_read_back(path: Path, ref: Reference, returncode: int, stderr: str) -> dict:
    import numpy as np

    npy, err = Path(f"{path}.readback.npy"), Path(f"{path}.readback.err")
    error = err.read_text() if err.exists() else f"the read-back process exited with {returncode}: {stderr.strip()[-300:]}"
    err.unlink(missing_ok=True)
    if error or not npy.exists():
        return {"file": path.name, "error": error}
    flat = np.load(npy)
    npy.unlink()
    cuts = np.cumsum([len(ids) for ids in ref.conversation_ids])[:-1]
    top1, positions, diff = _top1(ref.logits, np.split(flat, cuts))
    return {"file": path.name, "top1_agreement": top1, "max_abs_logit_diff": diff, "positions": positions}


def read_back_tokenizer(path: Path, chat_template: str, eot_token: str) -> dict:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (NotImplementedError, ValueError, KeyError) as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {"chat_template_matches": tok.chat_template == chat_template, "eos_token": tok.eos_token,
            "eos_is_end_of_turn": tok.eos_token == eot_token}


def judge(v: GGUFVerification, min_top1: float, rope_freqs: bool) -> None:
    """Fill `failures` with every limit a file misses (q4_k_m is reported, not bound, past its tokenizer)."""
    if v.metadata_matches is False:
        v.failures.append("llama.cpp reads a chat template, EOS or EOT from the file that is not the training one")
    if v.tokenizer_matches is False:
        v.failures.append("llama.cpp tokenizes the rendered chat template differently from the training tokenizer")
    if v.template_prompt_matches is False:
        v.failures.append("the GGUF's chat template, as llama-cpp-python renders it, does not give the training prompt")
    if v.runtime and v.type in EXACT_TYPES:
        for i, (m, n) in enumerate(zip(v.greedy_tokens_matched, v.greedy_tokens_compared)):
            if m < n:
                v.failures.append(f"greedy reply to sample prompt {i + 1} leaves the merged model's at token {m + 1} of {n}")
    if v.runtime and v.type in BOUND_TYPES:
        if v.top1_agreement < min_top1:
            v.failures.append(f"top-1 agreement {v.top1_agreement:.4f} with the merged model (limit {min_top1})")
        for i, stop in enumerate(v.stops_at_end_of_turn):
            if stop is False:
                v.failures.append(f"the chat completion of sample prompt {i + 1} through the GGUF's template does not "
                                  "stop at end-of-turn, though the merged model does")
    rb = v.readback
    if not rb:
        return
    # llama.cpp is the runtime people load; transformers' read-back binds only where llama.cpp
    # is not installed. It does not read everything llama.cpp does (the rope_freqs tensor of Llama 3
    # RoPE scaling; Gemma 2's query scaling and soft-caps come from its defaults), so there it is reported.
    if v.runtime is None:
        if "error" in rb:
            v.failures.append(f"transformers' GGUF loader cannot read the file ({rb['error']}) and llama.cpp is not "
                              "installed: nothing verified it")
        elif v.type in BOUND_TYPES and not rope_freqs and rb["top1_agreement"] < min_top1:
            v.failures.append(f"read back by transformers' GGUF loader: top-1 agreement {rb['top1_agreement']:.4f} (limit {min_top1})")
    tok = rb.get("tokenizer")
    if tok and "error" not in tok and not (tok["chat_template_matches"] and tok["eos_is_end_of_turn"]):
        v.failures.append(f"read back by transformers: chat template matches {tok['chat_template_matches']}, EOS {tok['eos_token']!r}")


def describe(v: GGUFVerification) -> str:
    parts = []
    if v.runtime:
        g = ", ".join(f"{m}/{n}" for m, n in zip(v.greedy_tokens_matched, v.greedy_tokens_compared))
        tie_list = [f"prompt {i + 1} token {t['token']} (gap {t['merged_margin']:.3g})"
                    for i, ts in enumerate(v.greedy_ties or []) for t in ts]
        if tie_list:
            g += (f" [near-ties decided by rounding, gap <= the file's {v.rounding_gap_shift:.3g}: "
                  f"{', '.join(tie_list)}]")
        stops = ["yes" if s else ("n/a" if s is None else "NO") for s in v.stops_at_end_of_turn]
        parts.append(f"llama.cpp: greedy tokens equal {g}, top-1 agreement {v.top1_agreement:.4f} over {v.positions} "
                     f"positions, stops at end-of-turn {'/'.join(stops)}, tokenizer {'same' if v.tokenizer_matches else 'DIFFERENT'}")
    rb = v.readback
    if rb and "error" in rb:
        parts.append(f"transformers read-back: cannot read it ({rb['error']})")
    elif rb:
        parts.append(f"transformers read-back: top-1 {rb['top1_agreement']:.4f}, max |logit diff| {rb['max_abs_logit_diff']:.3g}")
    return "; ".join(parts) or "not verified"


def verify_gguf(
    files: list[tuple[Path, str]],
    merged_dir: Path,
    tokenizer,
    prompts: list[list[dict]],
    conversations: list[list[dict]],
    end_of_turn: str,
    chat_template: str,
    greedy_tokens: int,
    min_top1: float,
    threads: int,
    rope_freqs: bool,
) -> list[GGUFVerification]:
    import torch

    from llmtune.export.gguf_convert import llama_cpp_version

    runtime = llama_cpp_version()
    if runtime is None:
        console.print("  [yellow]llama.cpp runtime not installed[/] (llama-cpp-python: `pip install 'llmtune[gguf]'` "
                      "builds it from source, see docs/export.md); verifying with transformers' GGUF loader only")
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    conversation_ids = [chat_ids(tokenizer, c, generation_prompt=False) for c in conversations]
    # With llama.cpp, transformers reads back the file the Modelfile uses; without, every file.
    preferred = next((p for p, t in files if t == "q8_0"), files[0][0])
    read_back = [p for p, _ in files if runtime is None or p == preferred]
    # The read-back takes ~25 s of one core even for 135M parameters (the loader parses the whole
    # vocabulary twice), so it runs in a second process while this one checks llama.cpp, on one
    # core fewer: threads that share a core with another busy process stall each other.
    proc = _start_read_back(read_back, conversation_ids)
    every_core, torch_threads = threads, torch.get_num_threads()
    threads = max(1, threads - 1)
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        ref = reference(merged_dir, tokenizer, prompts, conversations, eot, budget=4 * greedy_tokens)
        timings = {"reference": time.perf_counter() - t0}
        results = []
        for path, outtype in files:
            t0 = time.perf_counter()
            # Once the read-back process has finished, the checks left take every core.
            free = every_core if proc.poll() is not None else threads
            results.append(check_in_llama_cpp(path, outtype, ref, greedy_tokens, free, prompts, chat_template)
                           if runtime else GGUFVerification(path.name, outtype, None))
            results[-1].seconds = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        stderr = proc.communicate()[1]
        timings["read-back wait"] = time.perf_counter() - t0
        for v, (path, _) in zip(results, files):
            if path in read_back:
                v.readback = _finish_read_back(path, ref, proc.returncode, stderr)
                if runtime is None:  # llama.cpp's own reading of template and EOS covers it otherwise
                    v.readback["tokenizer"] = read_back_tokenizer(path, chat_template, end_of_turn)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        read_back[0].with_name(".readback-job.json").unlink(missing_ok=True)
        torch.set_num_threads(torch_threads)
    for v in results:
        judge(v, min_top1, rope_freqs)
        console.print(f"  {v.file}: {describe(v)}{'' if not v.failures else ' [red]FAILED[/]'}")
    spent = ", ".join(f"{k} {t:.1f}s" for k, t in timings.items())
    console.print(f"  verification time: {spent}, llama.cpp checks " + ", ".join(f"{v.type} {v.seconds:.1f}s" for v in results))
    return results


if __name__ == "__main__":  # python -m llmtune.export.gguf_verify JOB.json: the read-back process
    job = json.loads(Path(sys.argv[1]).read_text())
    for file in job["files"]:
        error = read_back_logits(file, job["conversation_ids"], f"{file}.readback.npy")
        Path(f"{file}.readback.err").write_text(error)
