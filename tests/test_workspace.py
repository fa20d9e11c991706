"""The latent workspace (docs/methods.md §11): the activation store against brute force, its exact merge over two
gloo processes and its resume, the unembedding readout against a hand computation, the SAELens export against a
hand-written JumpReLU forward, and the static page in a real headless Chromium driven over the DevTools protocol."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tiny_models import llama

from crosscoder.chunks import ActivationChunk
from crosscoder.dictionary import BatchTopKCrossCoder, BatchTopKSAE
from crosscoder.distributed import Distributed
from crosscoder.eval.exclusivity import CHAT_ONLY, latent_classes, relative_norm_difference
from crosscoder.eval.report import EvalConfig, evaluate
from crosscoder.eval.workspace import (
    ActivationStore,
    StoreSettings,
    WorkspaceContent,
    collect_store,
    export_json,
    export_saelens,
    latent_columns,
    quantile_buckets,
    sample_priority,
    unembedding_readout,
    write_workspace,
)
from crosscoder.eval.workspace.store import ROW_BITS


class ListSource:
    """A deterministic ChunkSource over a list of chunks; ``fail_after`` raises after that many chunks (a crash)."""

    def __init__(self, chunks: list[ActivationChunk], fail_after: int | None = None) -> None:
        self.items, self.position, self.fail_after = chunks, 0, fail_after

    def chunks(self):
        while self.position < len(self.items):
            if self.fail_after is not None and self.position >= self.fail_after:
                raise KeyboardInterrupt
            self.position += 1
            yield self.items[self.position - 1]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def description(self) -> dict:
        return {}


def synthetic_chunks(n_chunks: int = 6, tokens: int = 80, d_model: int = 16, seed: int = 0) -> list[ActivationChunk]:
    generator = torch.Generator().manual_seed(seed)
    return [
        ActivationChunk(
            torch.randn(tokens, 2, d_model, generator=generator),
            torch.arange(tokens) + 1000 + index * tokens,  # a token id names its position in the stream
            torch.arange(tokens) // 20,
        )
        for index in range(n_chunks)
    ]


def small_crosscoder(dict_size: int = 64, d_model: int = 16, seed: int = 0) -> BatchTopKCrossCoder:
    torch.manual_seed(seed)
    crosscoder = BatchTopKCrossCoder(d_model, dict_size, k=4)
    with torch.no_grad():
        crosscoder.b_enc.fill_(-0.8)
        crosscoder.W_dec[: dict_size // 4, 0] *= 0.05  # a quarter chat-only
    return crosscoder


def store_tensors(store: ActivationStore) -> dict[str, torch.Tensor]:
    return {
        "counts": store.counts,
        "histogram": store.histogram,
        "sum": store.activation_sum,
        **store.top.tensors("top"),
        **store.sample.tensors("sample"),
    }


def assert_same_store(a: ActivationStore, b: ActivationStore) -> None:
    assert a.tokens == b.tokens
    left, right = store_tensors(a), store_tensors(b)
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=1e-12, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------------------------------- the store
def test_top_contexts_and_quantile_buckets_equal_a_brute_force_pass():
    chunks, dict_size = synthetic_chunks(), 64
    crosscoder = small_crosscoder(dict_size)
    settings = StoreSettings(dict_size, n_top=5, n_quantiles=3, per_quantile=2, before=3, after=2)
    store = ActivationStore(settings)
    codes = []
    for index, chunk in enumerate(chunks):
        chunk_codes = crosscoder.encode(chunk.activations).detach()
        codes.append(chunk_codes)
        store.update(chunk_codes, chunk.token_ids, chunk.sequence_ids, index)
    everything = torch.cat(codes)  # [tokens, dict_size]; row t is token id 1000 + t
    keys = torch.cat([index * (1 << ROW_BITS) + torch.arange(80) for index in range(len(chunks))])
    assert store.counts.tolist() == (everything > 0).sum(0).tolist()
    for latent in range(dict_size):
        rows = everything[:, latent].nonzero().squeeze(1)
        values = everything[rows, latent]
        by_value = sorted(zip((-values).tolist(), keys[rows].tolist(), rows.tolist(), strict=True))
        top = [row for _, _, row in by_value[: settings.n_top]]
        assert [e.token_ids[e.center] - 1000 for e in store.top_examples(latent)] == top
        priority = sample_priority(keys[rows], torch.full_like(rows, latent), settings.seed)
        sampled = [row for _, _, row in sorted(zip(priority.tolist(), keys[rows].tolist(), rows.tolist(), strict=True))]
        sampled = sampled[: settings.n_sample]
        column = everything[:, latent].tolist()
        expected = quantile_buckets(sampled, column.__getitem__, settings.n_quantiles)
        buckets = store.quantile_examples(latent)
        assert [[e.token_ids[e.center] - 1000 for e in bucket] for bucket in buckets] == expected
        for bucket in buckets:
            for example in bucket:  # each window: the neighbours' ids and the latent's activation on them
                row = example.token_ids[example.center] - 1000
                for offset, (token, activation) in enumerate(zip(example.token_ids, example.activations, strict=True)):
                    neighbour = row + offset - settings.before
                    if token != -1:
                        assert token == 1000 + neighbour and neighbour // 20 == row // 20
                        assert activation == pytest.approx(float(everything[neighbour, latent]))
    assert sum(len(b) for b in store.quantile_examples(0)) <= settings.n_sample
    frequent = int(store.counts.argmax())
    assert [len(b) for b in store.quantile_examples(frequent)] == [2, 2, 2]
    lows = [min(e.activation for e in b) for b in store.quantile_examples(frequent)]
    assert lows == sorted(lows)


def test_an_interrupted_pass_resumes_to_the_store_of_an_uninterrupted_one(tmp_path):
    chunks, crosscoder = synthetic_chunks(), small_crosscoder()
    settings = StoreSettings(64, n_top=4, n_quantiles=2, per_quantile=2)
    whole = collect_store(crosscoder, ListSource(chunks), tmp_path / "whole", settings, max_tokens=10_000)
    crashing = ListSource(chunks, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        collect_store(crosscoder, crashing, tmp_path / "r", settings, max_tokens=10_000, checkpoint_every=1)
    assert json.loads((tmp_path / "r" / "partial" / "store.json").read_text())["chunks_done"] == 4
    resumed = collect_store(crosscoder, ListSource(chunks), tmp_path / "r", settings, max_tokens=10_000)
    assert_same_store(resumed, whole)
    assert not (tmp_path / "r" / "partial").exists()
    reopened = collect_store(crosscoder, ListSource([]), tmp_path / "r", settings, max_tokens=10_000)  # no compute
    assert_same_store(reopened, whole)


def _gloo_worker(rank: int, folder: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        crosscoder, chunks = small_crosscoder(), synthetic_chunks()
        settings = StoreSettings(64, n_top=4, n_quantiles=2, per_quantile=2)
        source = ListSource(chunks[rank::2])  # rank r holds chunks r, r + 2, …: its i-th is chunk 2i + r
        collect_store(
            crosscoder, source, Path(folder), settings, max_tokens=10_000, context=Distributed(rank=rank, world_size=2)
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_merge_into_the_store_of_one_pass(tmp_path):
    with socket.socket() as probe:  # a free port: bind to 0 and read it back
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_gloo_worker, args=(str(tmp_path / "two"), port), nprocs=2, join=True)
    settings = StoreSettings(64, n_top=4, n_quantiles=2, per_quantile=2)
    single = collect_store(
        small_crosscoder(), ListSource(synthetic_chunks()), tmp_path / "one", settings, max_tokens=10_000
    )
    merged, meta = ActivationStore.load(tmp_path / "two")
    assert meta["complete"] and meta["world_size"] == 2
    assert_same_store(merged, single)


# ---------------------------------------------------------------------------------------------------- readout
def test_the_unembedding_readout_equals_a_hand_computation():
    model = llama(64, hidden=16)
    crosscoder = small_crosscoder(dict_size=8)
    with torch.no_grad():
        crosscoder.input_scale.copy_(torch.tensor([0.5, 2.0]))
    readout = unembedding_readout(crosscoder, {"base": model, "chat": model}, [1, 6], k=5)
    norm, head = model.model.norm, model.lm_head.weight
    for name, source in (("base", 0), ("chat", 1)):
        for row, latent in enumerate([1, 6]):
            d = crosscoder.W_dec[latent, source].detach() / crosscoder.input_scale[source]
            normed = norm.weight * d / torch.sqrt(d.pow(2).mean() + norm.variance_epsilon)
            logits = head @ normed
            assert readout[name].promoted[row].tolist() == logits.topk(5).indices.tolist()
            assert readout[name].suppressed[row].tolist() == logits.topk(5, largest=False).indices.tolist()
            torch.testing.assert_close(readout[name].promoted_logits[row], logits.topk(5).values.detach())


# ---------------------------------------------------------------------------------------------------- SAELens
def test_a_saelens_export_reloads_with_the_same_encode_and_decode(tmp_path):
    torch.manual_seed(0)
    sae = BatchTopKSAE(16, 64, k=4)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
        sae.input_mean.normal_()
        sae.input_scale.fill_(0.7)
        sae.threshold.fill_(0.4)
    export_saelens(sae, str(tmp_path / "sae"))  # a str folder as well as a Path
    config = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert config["architecture"] == "jumprelu" and config["apply_b_dec_to_input"]
    assert (config["d_in"], config["d_sae"]) == (16, 64) and weights["W_enc"].shape == (16, 64)

    def jumprelu_encode(x):  # SAELens's JumpReLU forward, written out
        hidden = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
        return torch.relu(hidden) * (hidden > weights["threshold"])

    x = torch.randn(200, 16) * 3
    codes = jumprelu_encode(x)
    expected = sae.encode(x).detach()
    assert (codes > 0).float().mean() > 0.02  # the threshold keeps some, drops others
    torch.testing.assert_close(codes, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        codes @ weights["W_dec"] + weights["b_dec"], sae.decode(expected).detach(), rtol=1e-4, atol=1e-4
    )


def test_a_crosscoder_is_not_exported_to_saelens(tmp_path):
    with pytest.raises(ValueError, match="SAELens export takes a BatchTopKSAE"):
        export_saelens(small_crosscoder(), tmp_path)


# ---------------------------------------------------------------------------------------------------- the page
def workspace_of(tmp_path: Path, dict_size: int) -> tuple[Path, BatchTopKCrossCoder, ActivationStore]:
    crosscoder = small_crosscoder(dict_size)
    store = collect_store(
        crosscoder,
        ListSource(synthetic_chunks(n_chunks=4, tokens=100)),
        tmp_path / "store",
        StoreSettings(dict_size, n_top=4, n_quantiles=2, per_quantile=2),
        max_tokens=10_000,
    )
    content = WorkspaceContent(
        "synthetic crosscoder",
        dict_size,
        latent_columns(crosscoder, store),
        {"tokens": store.tokens},
        store=store,
        decode=lambda token: f"tok{token}",
    )
    write_workspace(tmp_path / "ws", content, shard_size=256)
    return tmp_path / "ws", crosscoder, store


def test_shards_export_as_json_records(tmp_path):
    folder, _, store = workspace_of(tmp_path, 300)
    files = export_json(folder, tmp_path / "export")
    assert [path.name for path in files] == ["shard_00000.json", "shard_00001.json"]
    record = json.loads(files[1].read_text())["latents"]["260"]
    assert [e["activation"] for e in record["top"]] == pytest.approx(
        [e.activation for e in store.top_examples(260)], rel=1e-6
    )
    assert sum(count for _, count in record["histogram"]["bins"]) == int(store.counts[260])


def test_no_models_builds_the_workspace_from_the_weights_alone(tmp_path):
    small_crosscoder().save_pretrained(tmp_path / "dictionary")
    report = evaluate(EvalConfig(str(tmp_path / "dictionary"), out=tmp_path / "out", no_models=True, progress=False))
    assert sum(report["exclusivity"]["counts"].values()) == 64
    table = (tmp_path / "out" / "table.js").read_text()
    assert table.startswith("workspaceTable(") and '"delta_norm"' in table and '"frequency"' not in table
    assert (tmp_path / "out" / "index.html").exists() and len(list((tmp_path / "out" / "latents").iterdir())) == 1


class Chromium:
    """Headless Chromium driven over the DevTools protocol (a websocket to the page's target)."""

    def __init__(self, profile: Path) -> None:
        import websocket

        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser is None:
            pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
        flags += ["--disable-component-update", "--disable-sync", "--remote-debugging-port=0"]
        self.process = subprocess.Popen(
            [browser, *flags, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.loads(response.read())
        page = next(target for target in targets if target["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.counter = 0

    def send(self, method: str, **params) -> dict:
        self.counter += 1
        self.socket.send(json.dumps({"id": self.counter, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.counter:
                if "error" in message:
                    raise RuntimeError(message["error"])
                return message["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (awaited when it is a promise)."""
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, condition: str, timeout_ms: int = 20_000):
        return self.evaluate(
            f"""new Promise((resolve, reject) => {{ const start = Date.now(); (function poll() {{
                  let value; try {{ value = ({condition}); }} catch (e) {{ value = null; }}
                  if (value) resolve(value); else if (Date.now() - start > {timeout_ms}) reject(new Error("timeout: "
                  + {json.dumps(condition)})); else setTimeout(poll, 25); }})(); }})"""
        )

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && document.querySelector('#page-info')?.textContent")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def chromium(tmp_path):
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    browser = Chromium(profile)
    yield browser
    browser.close()


ALL_ROW_IDS = """(() => { const ids = []; document.querySelector('#page-size').value = '1000';
  document.querySelector('#page-size').dispatchEvent(new Event('change'));
  for (;;) { document.querySelectorAll('#latents tbody td.latent').forEach((td) => ids.push(Number(td.textContent)));
    const next = document.querySelector('#next'); if (next.disabled) break; next.click(); }
  return ids; })()"""


@pytest.mark.slow
def test_the_page_lists_sorts_filters_and_opens_every_latent_of_4096(tmp_path, chromium):
    folder, crosscoder, store = workspace_of(tmp_path, 4096)
    assert len(list((folder / "latents").glob("shard_*.js"))) == 16
    chromium.open(f"file://{folder / 'index.html'}")
    assert chromium.evaluate("document.querySelector('#page-info').textContent") == "rows 1–100 of 4096"
    assert sorted(chromium.evaluate(ALL_ROW_IDS)) == list(range(4096))  # every latent, through the pages

    chromium.evaluate("document.querySelector('#headers th[data-col=frequency]').click()")
    shown = chromium.evaluate(
        "Array.from(document.querySelectorAll('#latents tbody tr')).slice(0, 50).map((tr) =>"
        " Number(tr.querySelector('td.latent').textContent))"
    )
    frequencies = store.frequencies
    assert [float(frequencies[i]) for i in shown] == sorted(frequencies.tolist(), reverse=True)[:50]
    assert shown != list(range(50))

    classes = latent_classes(relative_norm_difference(crosscoder))
    chat_only = {i for i, label in enumerate(classes) if label == CHAT_ONLY}
    chromium.evaluate(
        "(() => { const select = document.querySelector('#filters select[data-col=class]');"
        " select.value = Array.from(select.options).find((o) => o.text === 'chat-only').value;"
        " select.dispatchEvent(new Event('change')); })()"
    )
    assert 0 < len(chat_only) < 4096
    assert set(chromium.evaluate(ALL_ROW_IDS)) == chat_only
    shown_classes = chromium.evaluate(
        "Array.from(document.querySelectorAll('#latents tbody td[data-col=class]')).map((td) => td.textContent)"
    )
    assert set(shown_classes) == {"chat-only"}

    latent = int(store.counts.argmax())
    top = store.top_examples(latent)
    chromium.evaluate(f"location.hash = '#latent={latent}'")
    count = chromium.wait_for("document.querySelectorAll('#latent-view .example').length")
    assert count == len(top) + sum(len(bucket) for bucket in store.quantile_examples(latent))
    assert chromium.evaluate("document.querySelector('#latent-view h2').textContent") == f"Latent {latent}"
    centre = chromium.evaluate("document.querySelector('#latent-view .example .center').textContent")
    assert centre == f"tok{top[0].token_ids[top[0].center]}"
    assert chromium.evaluate("document.querySelector('#table-view').hidden") is True
    assert chromium.evaluate("document.querySelectorAll('script[src^=\"latents/\"]').length") == 1  # one shard
    assert os.path.getsize(folder / "table.js") < 2_000_000
