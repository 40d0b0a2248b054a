"""The watermark without a server: the scheme's statistics, the vLLM processor's arithmetic and its
async-scheduling behaviour (with vLLM's own placeholder repair), the secret, and the CLI.
tests/serve/test_watermark_vllm.py has the real vLLM and gateway."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmtune.serve.store import open_store
from llmtune.serve.vllm_server import VLLMConfig
from llmtune.watermark.scheme import WatermarkKey, detect_tokens, green_pairs
from llmtune.watermark.secret import SECRET_ENV, SECRET_NAME, deployment_key
from tests.conftest import run_cli

V = 4096
KEY = WatermarkKey(b"test-secret-one")


def processor(monkeypatch, key: WatermarkKey = KEY, vocab: int = V, delta: float = 2.0):
    from llmtune.watermark.vllm_processor import KGWWatermark

    monkeypatch.setenv("LLMTUNE_WATERMARK_KEY", key.secret.hex())
    monkeypatch.setenv("LLMTUNE_WATERMARK_GAMMA", repr(key.gamma))
    monkeypatch.setenv("LLMTUNE_WATERMARK_DELTA", repr(delta))
    config = SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: vocab))
    return KGWWatermark(config, torch.device("cpu"), False)


def batch_update(added=(), removed=(), size=1):
    from vllm.v1.sample.logits_processor import BatchUpdate

    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=[])


def sample(proc, n_tokens: int, seed: int) -> list[int]:
    """Sample one request token by token through the processor, as vLLM does (temperature 1)."""
    g = torch.Generator().manual_seed(seed)
    output: list[int] = []
    if proc is not None:
        proc.update_state(batch_update([(0, None, [1, 2, 3], output)]))
    for _ in range(n_tokens):
        logits = torch.randn(1, V, generator=g) * 2
        if proc is not None:
            proc.update_state(None)
            logits = proc.apply(logits)
        output.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g)))
    return output


def test_tables_are_prefix_stable_and_green_share_is_gamma():
    small, big = KEY.tables(100), KEY.tables(V)
    assert np.array_equal(small, big[:, :100])  # padded model vocab and tokenizer vocab agree
    rng = np.random.default_rng(0)
    prev, tok = rng.integers(0, V, 200_000), rng.integers(0, V, 200_000)
    assert abs(green_pairs(big, prev, tok, KEY.threshold).mean() - 0.25) < 0.005
    other = WatermarkKey(b"test-secret-two")
    overlap = green_pairs(big, prev, tok, KEY.threshold) & green_pairs(other.tables(V), prev, tok, other.threshold)
    assert abs(overlap.mean() - 0.25**2) < 0.005  # another secret's lists are independent of these


def test_processor_arithmetic_matches_the_detector_exactly(monkeypatch):
    proc = processor(monkeypatch)
    output = [17]
    proc.update_state(batch_update([(0, None, [1], output)]))
    for prev in (17, 0, V - 1, 1234):
        output[-1] = prev
        out = proc.apply(torch.zeros(1, V))
        expected = green_pairs(KEY.tables(V), np.full(V, prev), np.arange(V), KEY.threshold)
        assert np.array_equal(out[0].numpy() == 2.0, expected)  # int32 wrap-around agrees with numpy's


def test_watermarked_text_is_detected_and_other_keys_and_plain_text_are_not(monkeypatch):
    marked = sample(processor(monkeypatch), 200, seed=1)
    d = detect_tokens(marked, KEY)
    assert d.watermarked and d.p_value < 1e-10 and d.green / d.scored > 0.5
    assert not detect_tokens(marked, WatermarkKey(b"another deployment")).watermarked
    assert not detect_tokens(sample(None, 200, seed=1), KEY).watermarked
    short = detect_tokens(marked[:50], KEY)
    assert short.watermarked, short
    assert not detect_tokens(marked[:10], KEY).watermarked  # too short to call


def test_null_p_values_are_calibrated_and_repeats_do_not_inflate():
    rng = np.random.default_rng(3)
    tables = KEY.tables(V)
    p = np.array([detect_tokens(rng.integers(0, V, 100), KEY, tables=tables).p_value for _ in range(2000)])
    assert (p < 0.01).mean() <= 0.02 and (p < 0.1).mean() <= 0.13
    green_pair = next((a, b) for a in range(V) for b in range(V) if green_pairs(tables, np.array([a]), np.array([b]), KEY.threshold)[0])
    looped = [green_pair[0], green_pair[1]] * 100  # one green pair repeated: counted once per distinct pair
    assert detect_tokens(looped, KEY).scored <= 2 and not detect_tokens(looped, KEY).watermarked


def test_async_scheduling_placeholders_are_repaired_before_apply_reads_them(monkeypatch):
    """vllm#52461: under async scheduling the worker appends -1 before update_state and puts the
    sampled id in place only before sampling. vLLM's own repair (InputBatch.update_async_output_token_ids)
    runs here between the two; the processor reads the previous token in apply, after it."""
    from vllm.v1.worker.gpu_input_batch import InputBatch

    proc = processor(monkeypatch)
    output = [5]
    proc.update_state(batch_update([(0, None, [1], output)]))
    seen_in_update_state = []

    output.append(-1)  # step N+1 scheduled before step N's token reached the CPU
    proc.update_state(None)
    seen_in_update_state.append(output[-1])
    batch = SimpleNamespace(sampling_metadata=SimpleNamespace(output_token_ids=[output]), req_ids=["r"],
                            prev_req_id_to_index={"r": 0}, sampled_token_ids_cpu=torch.tensor([[901]]),
                            async_copy_ready_event=SimpleNamespace(synchronize=lambda: None))
    InputBatch.update_async_output_token_ids(batch)  # what GPUModelRunner._sample calls before the sampler
    out = proc.apply(torch.zeros(1, V))
    assert seen_in_update_state == [-1]  # a processor that cached the id in update_state would mark with the wrong list
    expected = green_pairs(KEY.tables(V), np.full(V, 901), np.arange(V), KEY.threshold)
    assert output[-1] == 901 and np.array_equal(out[0].numpy() == 2.0, expected) and proc.placeholder_rows == 0

    output.append(-1)  # no repair (a plugin-loaded processor): that row is left unmarked and counted
    proc.update_state(None)
    assert torch.equal(proc.apply(torch.zeros(1, V)), torch.zeros(1, V)) and proc.placeholder_rows == 1


def test_batch_moves_and_removals_keep_each_row_on_its_own_request(monkeypatch):
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    proc = processor(monkeypatch)
    a, b = [10], [20]
    proc.update_state(batch_update([(0, None, [1], a), (1, None, [1], b)], size=2))
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
    out = proc.apply(torch.zeros(2, V))
    tables = KEY.tables(V)
    assert np.array_equal(out[1].numpy() == 2.0, green_pairs(tables, np.full(V, 10), np.arange(V), KEY.threshold))
    assert np.array_equal(out[0].numpy() == 2.0, green_pairs(tables, np.full(V, 20), np.arange(V), KEY.threshold))
    proc.update_state(BatchUpdate(batch_size=1, removed=[0], added=[], moved=[]))
    out = proc.apply(torch.zeros(2, V))
    assert torch.equal(out[0], torch.zeros(V)) and out[1].sum() > 0


def test_secret_is_made_once_per_store_and_shared(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    db = str(tmp_path / "llmtune.db")
    with pytest.raises(Exception, match="no watermark secret"):
        deployment_key(open_store(db), 0.25, create=False)  # detection never invents a secret
    first = deployment_key(open_store(db), 0.25)
    again = deployment_key(open_store(db), 0.25, create=False)  # another process, same place
    assert first == again and len(first.secret) == 32
    assert deployment_key(open_store(str(tmp_path / "other.db")), 0.25) != first
    assert len(open_store(db).deployment_secret(SECRET_NAME)) == 64
    monkeypatch.setenv(SECRET_ENV, "from-a-secret-manager")
    assert deployment_key(open_store(db), 0.25).secret == b"from-a-secret-manager"


def test_vllm_command_loads_the_processor_only_when_watermarked():
    plain = VLLMConfig(model="m")
    assert "--logits-processors" not in plain.command() and "LLMTUNE_WATERMARK_KEY" not in plain.environment()
    marked = VLLMConfig(model="m", watermark=KEY, watermark_delta=1.5)
    cmd = marked.command()
    assert cmd[cmd.index("--logits-processors") + 1] == "llmtune.watermark.vllm_processor:KGWWatermark"
    env = marked.environment()
    assert bytes.fromhex(env["LLMTUNE_WATERMARK_KEY"]) == KEY.secret and env["LLMTUNE_WATERMARK_DELTA"] == "1.5"


@pytest.mark.slow
def test_detect_cli_text_and_jsonl_keep_every_other_field(tmp_path, monkeypatch, tiny_tokenizer):
    from llmtune.models import resolve_base

    monkeypatch.delenv(SECRET_ENV, raising=False)
    model = resolve_base("embedded:tiny-random-llama")
    db = str(tmp_path / "llmtune.db")
    key = WatermarkKey(bytes.fromhex(open_store(db).deployment_secret(SECRET_NAME)))
    proc = processor(monkeypatch, key, vocab=49152)
    monkeypatch.delenv("LLMTUNE_WATERMARK_KEY")
    # a watermarked token sequence that survives decode -> encode (what the detector sees)
    g = torch.Generator().manual_seed(0)
    output: list[int] = []
    proc.update_state(batch_update([(0, None, [1], output)]))
    for _ in range(120):
        logits = proc.apply(torch.randn(1, 49152, generator=g))
        output.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g)))
    marked = tiny_tokenizer.decode(output, skip_special_tokens=True)
    plain = "The ship sails north past the copper cliffs, and the crew sings while the stew is warming. " * 3
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": 1, "text": marked, "meta": {"k": [1, 2]}}) + "\n" + json.dumps({"id": 2, "text": plain}) + "\n")
    r = run_cli("watermark", "detect", model, "--input", str(rows), "--output", str(tmp_path / "out.jsonl"), "--store", db)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["watermarked"] for o in out] == [True, False]
    assert out[0]["meta"] == {"k": [1, 2]} and out[0]["text"] == marked and out[0]["id"] == 1 and out[0]["p_value"] < 1e-6
    r = run_cli("watermark", "detect", model, "--text", marked, "--store", db, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["watermarked"], r.stderr
    r = run_cli("watermark", "detect", model, "--text", marked, "--store", str(tmp_path / "empty.db"))
    assert r.returncode == 2 and "no watermark secret" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_replicas_asking_at_once_agree_on_one_secret(backend, tmp_path, request):
    from concurrent.futures import ThreadPoolExecutor

    location = str(tmp_path / "llmtune.db") if backend == "sqlite" else request.getfixturevalue("postgres").new_database()
    open_store(location).close()  # migrated once; then eight "replicas" start together
    stores = [open_store(location) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        secrets = set(pool.map(lambda s: s.deployment_secret(SECRET_NAME), stores))
    assert len(secrets) == 1
