"""The watermark's detection power, quality cost and speed cost, measured in one run.

    .venv/bin/python bench/watermark.py [--model embedded:smollm2-135m-instruct] [--replies 48]

Two vLLM servers on the same model (CPU: float32, eager), one with llmtune's watermark processor
and one without, each behind the real gateway (real screen, keys, marking). Roleplay prompts
(the first user turn of each conversation in data/roleplay) are sent to both at concurrency 8,
in alternating rounds, as 200-token chat completions at temperature 1.0 (`min_tokens` 200, so
no reply stops early). Then, on the text the client received:

- detection: the share of watermarked replies with p < 1e-3 (the binomial test's false-positive
  rate is at most 1e-3 by construction; the observed rate on the unwatermarked replies and on
  the human-written assistant turns of data/roleplay is printed beside it), for the whole
  200-token replies, their first 50 tokens, and after 10% of the words are replaced by random
  words of other replies or 10% are deleted. Target: >= 0.95 at 200 tokens.
- quality: perplexity of each reply given its prompt under a reference model (--reference,
  default the served model itself: the only real language model this machine has), watermarked
  against unwatermarked; and the roleplay eval metrics of llmtune eval that apply to single
  replies (llmtune/eval/metrics.py), with their deltas.
- speed: completion tokens per second through the gateway, watermarked against not, at
  concurrency 8 (mean of the alternating rounds). Target: ratio >= 0.95. With --speed-rounds,
  more rounds in a rotating order: the median of the per-round ratios, and the vLLM servers'
  own CPU seconds per completion token (less stretched by other processes' load than wall
  clock, though vLLM's engine core and worker busy-wait on their queue, so heavy load inflates
  it too: measure on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 1e-3


def prompts(limit: int) -> list[list[dict]]:
    """system + first user turn of each conversation in data/roleplay (JSONL with `messages`)."""
    out = []
    for path in sorted((REPO / "data" / "roleplay").glob("*.jsonl")):
        if path.name == "bad_rows.jsonl":
            continue
        for line in path.read_text().splitlines():
            try:
                msgs = json.loads(line).get("messages") or []
            except (json.JSONDecodeError, AttributeError):
                continue
            head = [m for m in msgs[:2] if m.get("role") == "system"][:1]
            user = next((m for m in msgs if m.get("role") == "user" and (m.get("content") or "").strip()), None)
            if user:
                out.append([*({"role": "system", "content": m["content"]} for m in head), {"role": "user", "content": user["content"]}])
    return (out * (limit // max(len(out), 1) + 1))[:limit]


def human_replies() -> list[str]:
    texts = []
    for path in sorted((REPO / "data" / "roleplay").glob("*.jsonl")):
        if path.name == "bad_rows.jsonl":
            continue
        for line in path.read_text().splitlines():
            try:
                msgs = json.loads(line).get("messages") or []
            except (json.JSONDecodeError, AttributeError):
                continue
            texts += [m["content"] for m in msgs if m.get("role") == "assistant" and len((m.get("content") or "").split()) >= 30]
    return texts


def complete(client: OpenAI, messages: list[dict], tokens: int, seed: int) -> tuple[str | None, int]:
    """(the reply, completion tokens); the reply is None when the output screen withheld it."""
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=tokens, temperature=1.0, seed=seed,
                                       extra_body={"min_tokens": tokens})
    blocked = r.choices[0].finish_reason == "content_filter"
    return None if blocked else (r.choices[0].message.content or ""), r.usage.completion_tokens


def generate(clients: dict[str, OpenAI], todo: list[list[dict]], args) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
    """Both servers answer every prompt; rounds of 2 x concurrency requests alternate between them."""
    replies: dict[str, list[str]] = {name: [] for name in clients}
    rates: dict[str, list[float]] = {name: [] for name in clients}
    size = 2 * args.concurrency
    for start in range(0, len(todo), size):
        batch = todo[start:start + size]
        order = list(clients) if (start // size) % 2 == 0 else list(clients)[::-1]
        for name in order:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                done = list(pool.map(lambda i: complete(clients[name], batch[i], args.tokens, start + i), range(len(batch))))
            rates[name].append(sum(n for _, n in done) / (time.perf_counter() - t0))
            replies[name] += [text for text, _ in done]  # None where the output screen withheld the reply
        print(f"  {start + len(batch)}/{len(todo)} prompts: " + ", ".join(f"{n} {rates[n][-1]:.1f} tok/s" for n in clients), flush=True)
    return replies, rates


def attack(text: str, rate: float, rng: random.Random, pool: list[str], kind: str) -> str:
    words = text.split(" ")
    n = max(1, round(rate * len(words)))
    hit = set(rng.sample(range(len(words)), n))
    if kind == "delete":
        return " ".join(w for i, w in enumerate(words) if i not in hit)
    return " ".join(rng.choice(pool) if i in hit else w for i, w in enumerate(words))


def perplexities(model_dir: str, prompts_: list[list[dict]], replies: list[str]) -> list[float]:
    """exp(mean NLL) of each reply's tokens given its chat-templated prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for messages, reply in zip(prompts_, replies):
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            p_ids = tok(prompt, add_special_tokens=False).input_ids
            r_ids = tok(reply, add_special_tokens=False).input_ids
            if not r_ids:
                continue
            ids = torch.tensor([p_ids + r_ids])
            logits = model(ids).logits[0, len(p_ids) - 1:-1]
            nll = torch.nn.functional.cross_entropy(logits, ids[0, len(p_ids):])
            out.append(math.exp(float(nll)))
    return out


def eval_metrics(replies: list[str]) -> dict[str, float]:
    from llmtune.eval import metrics as M

    return {
        "distinct_1": statistics.mean(M.distinct_n(r, 1) for r in replies),
        "distinct_2": statistics.mean(M.distinct_n(r, 2) for r in replies),
        "speaks_for_user_rate": statistics.mean(M.speaks_for_user(r) for r in replies),
        "refusal_rate": statistics.mean(M.is_refusal(r) for r in replies),
        "slop_per_1k_words": M.slop_per_1k_words(replies),
        "cross_reply_4gram_rate": M.cross_reply_ngram_rate(replies),
    }


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a vLLM server and every process under it (the engine core)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def speed_rounds(gateways: dict[str, OpenAI], direct: dict[str, OpenAI], todo: list[list[dict]], args,
                 server_pids: dict[str, int]) -> dict:
    """Throughput only: rounds of 2 x concurrency requests, the four paths in a rotating order.
    Besides tokens per wall second, the vLLM server's own CPU seconds per completion token: on a
    shared machine other processes' load stretches wall time but not the server's CPU time, so
    the ratio of CPU per token is the throughput ratio of a CPU-bound server on an idle machine."""
    paths = [("gateway", n) for n in gateways] + [("direct", n) for n in direct]
    rates: dict[str, list[float]] = {f"{kind} {name}": [] for kind, name in paths}
    cpu: dict[str, list[float]] = {name: [0.0, 0] for name in gateways}  # CPU seconds, tokens
    idle = [0.0, 0.0]  # CPU seconds of the idle server, wall seconds
    size = 2 * args.concurrency
    for r in range(args.speed_rounds):
        batch = [todo[(r * size + i) % len(todo)] for i in range(size)]
        for kind, name in paths[r % 4:] + paths[:r % 4]:
            client = (gateways if kind == "gateway" else direct)[name]
            other = next(n for n in server_pids if n != name)
            c0, i0, t0 = server_cpu_seconds(server_pids[name]), server_cpu_seconds(server_pids[other]), time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                done = list(pool.map(lambda i: complete(client, batch[i], args.tokens, 1000 + i), range(size)))
            tokens, wall = sum(n for _, n in done), time.perf_counter() - t0
            rates[f"{kind} {name}"].append(tokens / wall)
            cpu[name][0] += server_cpu_seconds(server_pids[name]) - c0
            cpu[name][1] += tokens
            idle[0] += server_cpu_seconds(server_pids[other]) - i0  # the server with no requests: should be ~0
            idle[1] += wall
        print(f"  speed round {r + 1}/{args.speed_rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
    out = {k: statistics.mean(v) for k, v in rates.items()} | {"rounds": args.speed_rounds}
    out["server cpu ms per token"] = {name: 1000 * c / max(n, 1) for name, (c, n) in cpu.items()}
    out["idle server cpu share"] = idle[0] / max(idle[1], 1e-9)  # if a waiting server burns CPU, the CPU ratio misleads
    # Load drifts slowly on a shared machine: the ratio within each round (the paths run back to
    # back) cancels most of it, so the median of those per-round ratios is the figure to quote.
    for kind in ("gateway", "direct"):
        per_round = sorted(m / p for m, p in zip(rates[f"{kind} watermarked"], rates[f"{kind} plain"]))
        out[f"{kind} per-round ratios"] = per_round
        out[f"{kind} median ratio"] = statistics.median(per_round)
    return out


def processor_ms(vocab: int, rows: int, steps: int = 300) -> float:
    """The processor's own time per decoding step (apply on rows x vocab logits), one thread, in this process."""
    import os
    from types import SimpleNamespace

    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate

    from llmtune.watermark.vllm_processor import KGWWatermark

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # vLLM's CPU worker runs its OpenMP threads on its own core(s)
    os.environ.setdefault("LLMTUNE_WATERMARK_KEY", "00" * 32)
    proc = KGWWatermark(SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: vocab)), torch.device("cpu"), False)
    outputs = [[i + 5] for i in range(rows)]
    proc.update_state(BatchUpdate(rows, [], [(i, None, [1], outputs[i]) for i in range(rows)], []))
    logits = torch.randn(rows, vocab)
    proc.apply(logits)
    start = time.perf_counter()
    for _ in range(steps):
        proc.apply(logits)
    torch.set_num_threads(threads)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--reference", default=None, help="reference model for perplexity (default: the served model)")
    ap.add_argument("--replies", type=int, default=48, help="prompts (each answered by both servers)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    ap.add_argument("--processor-only", action="store_true", help="only the processor's time per step (no servers)")
    ap.add_argument("--speed-rounds", type=int, default=0,
                    help="then this many more alternating throughput rounds per path, direct to vLLM and through the gateway")
    args = ap.parse_args()
    if args.processor_only:
        import json as _json

        from llmtune.models import resolve_base

        vocab = _json.loads((Path(resolve_base(args.model)) / "config.json").read_text())["vocab_size"]
        print(f"processor apply: {processor_ms(vocab, args.concurrency):.2f} ms per step at {args.concurrency} x {vocab} "
              "(one thread)")
        return

    import os

    from llmtune.models import resolve_base
    from llmtune.moderation import load_screener
    from llmtune.serve.config import RateLimit, ServeConfig
    from llmtune.serve.gateway import create_app
    from llmtune.serve.keys import AgeVerification
    from llmtune.serve.run import GatewayThread, served_tokenizer
    from llmtune.serve.store import open_store
    from llmtune.serve.vllm_server import VLLMConfig, VLLMServer
    from llmtune.watermark.detect import DetectRequest, Detector
    from llmtune.watermark.scheme import SCHEME
    from llmtune.watermark.secret import deployment_key

    model = resolve_base(args.model)
    load_before = os.getloadavg()
    screener = load_screener(ServeConfig().moderation)
    candidates = prompts(args.replies)
    # Prompts the gateway's input screen refuses would be 400s: left out, and counted.
    todo = [p for p in candidates if screener.conversation_state(p).decision().allowed]
    refused_prompts = len(candidates) - len(todo)
    print(f"{len(todo)} prompts ({refused_prompts} of {len(candidates)} refused by the input screen, left out)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ServeConfig(store=f"{tmp}/llmtune.db", rate_limit=RateLimit(requests_per_minute=100_000, burst=1000),
                          screen_timeout_s=600)  # a loaded machine: measure, do not withhold
        keys = open_store(cfg.store)
        api_key, _ = keys.add("bench", AgeVerification("bench", "bench", "2026-12-01"))
        key = deployment_key(keys, cfg.watermark.gamma)
        common = dict(model=model, served_name="m", dtype="float32", max_model_len=1024)
        marked_cfg = VLLMConfig(**common, watermark=key, watermark_delta=cfg.watermark.delta)
        plain_cfg = VLLMConfig(**common)
        print(f"starting two vLLM servers on {args.model} (one with the {SCHEME} processor) ...", flush=True)
        with VLLMServer(marked_cfg) as v_marked, VLLMServer(plain_cfg) as v_plain, \
                GatewayThread(create_app(cfg, v_marked.base_url, screener, keys, upstream_key=marked_cfg.api_key,
                                         tokenizer=served_tokenizer(model), watermark=SCHEME)) as g_marked, \
                GatewayThread(create_app(cfg, v_plain.base_url, screener, keys, upstream_key=plain_cfg.api_key,
                                         tokenizer=served_tokenizer(model))) as g_plain:
            clients = {"watermarked": OpenAI(base_url=f"{g_marked.base_url}/v1", api_key=api_key, max_retries=0),
                       "plain": OpenAI(base_url=f"{g_plain.base_url}/v1", api_key=api_key, max_retries=0)}
            for c in clients.values():  # warm up both paths
                complete(c, todo[0], 16, 0)
            replies, rates = generate(clients, todo, args)
            speed = None
            if args.speed_rounds:
                direct = {"watermarked": OpenAI(base_url=f"{v_marked.base_url}/v1", api_key=marked_cfg.api_key, max_retries=0),
                          "plain": OpenAI(base_url=f"{v_plain.base_url}/v1", api_key=plain_cfg.api_key, max_retries=0)}
                speed = speed_rounds(clients, direct, todo, args,
                                     {"watermarked": v_marked.proc.pid, "plain": v_plain.proc.pid})
    load_after = os.getloadavg()
    if speed:
        print(f"\nspeed only ({speed['rounds']} rounds per path, rotating order), tok/s at concurrency {args.concurrency}:")
        print(f"  through the gateway: watermarked {speed['gateway watermarked']:.1f}, plain {speed['gateway plain']:.1f} -> ratio "
              f"{speed['gateway watermarked'] / speed['gateway plain']:.3f} (target >= 0.95)")
        print(f"  direct to vLLM:      watermarked {speed['direct watermarked']:.1f}, plain {speed['direct plain']:.1f} -> ratio "
              f"{speed['direct watermarked'] / speed['direct plain']:.3f}")
        for kind in ("gateway", "direct"):
            q = statistics.quantiles(speed[f"{kind} per-round ratios"], n=4) if speed["rounds"] >= 2 else [float("nan")] * 3
            print(f"  {kind}: median of the per-round ratios {speed[f'{kind} median ratio']:.3f} "
                  f"(quartiles {q[0]:.3f} to {q[2]:.3f}, {speed['rounds']} rounds)")
        per_token = speed["server cpu ms per token"]
        print(f"  vLLM server CPU per completion token: watermarked {per_token['watermarked']:.2f} ms, plain "
              f"{per_token['plain']:.2f} ms -> throughput ratio by CPU cost {per_token['plain'] / per_token['watermarked']:.3f} "
              "(target >= 0.95; less sensitive to load than wall clock)")
        print(f"  a server with no requests used {speed['idle server cpu share']:.3f} CPU-seconds per second meanwhile "
              "(near 0: the CPU figure counts work, not waiting)")
        print(f"  load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
        if args.replies <= 16:
            return

    detect = Detector(DetectRequest(model, key, THRESHOLD))
    tokenizer = detect.tokenizer
    rng = random.Random(0)
    pool = [w for r in replies["plain"] if r for w in r.split()] or ["the"]

    def tpr(texts: list[str]) -> float:
        return statistics.mean(detect(t).p_value < THRESHOLD for t in texts)

    def first_tokens(text: str, n: int) -> str:
        return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids[:n])

    withheld = {name: sum(t is None for t in texts) for name, texts in replies.items()}
    kept = [i for i in range(len(todo)) if replies["watermarked"][i] is not None and replies["plain"][i] is not None]
    todo = [todo[i] for i in kept]
    marked, plain = [replies["watermarked"][i] for i in kept], [replies["plain"][i] for i in kept]
    humans = human_replies()
    result = {
        "model": args.model, "replies_per_server": len(marked), "tokens": args.tokens, "refused_prompts": refused_prompts,
        "withheld_replies": withheld,
        "tpr_200": tpr(marked),
        "tpr_50": tpr([first_tokens(t, 50) for t in marked]),
        "tpr_200_sub10": tpr([attack(t, 0.10, rng, pool, "substitute") for t in marked]),
        "tpr_200_del10": tpr([attack(t, 0.10, rng, pool, "delete") for t in marked]),
        "tpr_50_sub10": tpr([attack(first_tokens(t, 50), 0.10, rng, pool, "substitute") for t in marked]),
        "tpr_50_del10": tpr([attack(first_tokens(t, 50), 0.10, rng, pool, "delete") for t in marked]),
        "fpr_plain_200": tpr(plain), "fpr_plain_50": tpr([first_tokens(t, 50) for t in plain]),
        "fpr_human": tpr(humans) if humans else None, "human_texts": len(humans),
        "median_p_marked_200": statistics.median(detect(t).p_value for t in marked),
    }
    print("scoring perplexity under the reference model ...", flush=True)
    ref = resolve_base(args.reference) if args.reference else model
    ppl_m, ppl_p = perplexities(ref, todo, marked), perplexities(ref, todo, plain)
    result.update(ppl_marked=statistics.mean(ppl_m), ppl_plain=statistics.mean(ppl_p),
                  ppl_median_marked=statistics.median(ppl_m), ppl_median_plain=statistics.median(ppl_p),
                  reference=args.reference or args.model)
    result["ppl_ratio"] = result["ppl_marked"] / result["ppl_plain"]
    em, ep = eval_metrics(marked), eval_metrics(plain)
    result["eval_marked"], result["eval_plain"] = em, ep
    result["tok_s_marked"], result["tok_s_plain"] = statistics.mean(rates["watermarked"]), statistics.mean(rates["plain"])
    result["throughput_ratio"] = result["tok_s_marked"] / result["tok_s_plain"]
    result["rounds"] = len(rates["plain"])
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    result["processor_ms_per_step"] = processor_ms(vocab, args.concurrency)
    # A decoding step of the plain server at this concurrency: one token for each of the concurrent requests.
    result["step_ms_plain"] = args.concurrency / result["tok_s_plain"] * 1000
    result["load_avg_before"], result["load_avg_after"] = load_before, load_after

    r = result
    print(f"\nprompts refused by the input screen: {refused_prompts}; replies withheld by the output screen: {withheld} "
          "(left out of every number below, with the other server's reply to the same prompt)")
    print(f"model {args.model}; {r['replies_per_server']} prompts x 2 servers; {args.tokens}-token replies at temperature 1.0; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after ({os.cpu_count()} cores)")
    print(f"detection at p < {THRESHOLD:g} (binomial FPR <= {THRESHOLD:g}):")
    print(f"  {args.tokens} tokens: TPR {r['tpr_200']:.3f} (target >= 0.95); after 10% substitutions {r['tpr_200_sub10']:.3f}, "
          f"after 10% deletions {r['tpr_200_del10']:.3f}; median p {r['median_p_marked_200']:.2g}")
    print(f"   50 tokens: TPR {r['tpr_50']:.3f}; after 10% substitutions {r['tpr_50_sub10']:.3f}, after 10% deletions {r['tpr_50_del10']:.3f}")
    fh = "n/a" if r["fpr_human"] is None else f"{r['fpr_human']:.3f}"
    print(f"  observed false positives: unwatermarked replies {r['fpr_plain_200']:.3f} (200) / {r['fpr_plain_50']:.3f} (50), "
          f"human-written turns {fh} ({r['human_texts']})")
    print(f"quality: perplexity under {r['reference']}: watermarked {r['ppl_marked']:.2f}, plain {r['ppl_plain']:.2f} "
          f"-> ratio {r['ppl_ratio']:.3f} (medians {r['ppl_median_marked']:.2f} / {r['ppl_median_plain']:.2f})")
    for k in em:
        print(f"  {k}: watermarked {em[k]:.4f}, plain {ep[k]:.4f}, delta {em[k] - ep[k]:+.4f}")
    print(f"speed: gateway throughput at concurrency {args.concurrency} (mean of {r['rounds']} alternating rounds): "
          f"watermarked {r['tok_s_marked']:.1f} tok/s, plain {r['tok_s_plain']:.1f} tok/s -> ratio {r['throughput_ratio']:.3f} "
          "(target >= 0.95)")
    print(f"  the processor alone: {r['processor_ms_per_step']:.2f} ms per step at {args.concurrency} x {vocab} (one thread), "
          f"against a {r['step_ms_plain']:.0f} ms step of the plain server -> {r['processor_ms_per_step'] / r['step_ms_plain']:.1%}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
