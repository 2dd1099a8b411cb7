"""Our fused decoder against onnxruntime-genai's builder graph of the same weights, interleaved.

Three steps (the builder needs onnxruntime-genai, which is installed in its own venv):

    # 1. bench-0.5b's decoder as a Hugging Face Qwen2 folder
    .venv/bin/python benchmarks/genai_peer.py convert bench-0.5b /tmp/peer/hf
    # 2. the peer graphs (fp32 and int4, int4 with the same block size and accuracy level)
    /work/venv-genai/bin/python -m onnxruntime_genai.models.builder -i /tmp/peer/hf \
        -o /tmp/peer/genai-fp32 -p fp32 -e cpu -c /tmp/peer/cache
    /work/venv-genai/bin/python -m onnxruntime_genai.models.builder -i /tmp/peer/hf \
        -o /tmp/peer/genai-int4 -p int4 -e cpu -c /tmp/peer/cache \
        --extra_options int4_block_size=32 int4_accuracy_level=4
    # 3. how the two graphs differ (ops, MatMulNBits attributes, the LM head's bits)
    .venv/bin/python benchmarks/genai_peer.py graphs FUSED_DECODER.onnx /tmp/peer/genai-int4
    # 4. check the fp32 peer's logits against ours; time both with the same onnxruntime,
    #    alternating step by step
    .venv/bin/python benchmarks/genai_peer.py time ARTIFACT_FP32 /tmp/peer/genai-fp32 \
        --ours FUSED_DECODER.onnx --contexts 450,1024 --rounds 3
    # 5. where a difference lives: both under ORT's profiler, each weight matmul by role
    .venv/bin/python benchmarks/genai_peer.py profile ARTIFACT_FP32 /tmp/peer/genai-int4 \
        --ours FUSED_DECODER.onnx --context 450 --steps 100

Both graphs run on plain onnxruntime sessions (the genai graph with its own cache rule from its
genai_config.json: shared buffer or growing past), with the same threads; the decode step is
the graph call alone (ours also skips its embedding gather, a copy of one row).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from molmo_bench.idle import settle


def convert(model: str, out: str) -> None:
    """Write the decoder of `model` as a HF Qwen2 folder (tensor by tensor, no model loaded).

    The logits are checked where it matters, on the built peer graph against ours (`time`)."""
    from safetensors.numpy import save_file
    from transformers import Qwen2Config

    from molmo_export.export.onnx_export import resolve_checkpoint
    from molmo_export.export.tensor_source import CheckpointTensors

    src = CheckpointTensors(resolve_checkpoint(model))
    t = src.config.text
    if t.is_moe or t.norm_after or t.qk_norm or t.head_dim * t.num_heads != t.hidden_size:
        raise SystemExit("only Qwen2-structured decoders convert to a Qwen2 folder")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    Qwen2Config(
        vocab_size=t.embedding_size, hidden_size=t.hidden_size,
        intermediate_size=t.mlp_hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.layer_norm_eps,
        rope_theta=t.rope_theta, tie_word_embeddings=False, torch_dtype="float32",
        architectures=["Qwen2ForCausalLM"]).save_pretrained(out_dir)
    tensors: dict[str, np.ndarray] = {
        # the 128 extra image-token rows are not in a Qwen2 table (never used in text timing)
        "model.embed_tokens.weight":
            src.get("language_model.model.embed_tokens.weight")[:t.embedding_size],
        "model.norm.weight": src.get("language_model.model.norm.weight"),
        "lm_head.weight": src.get("language_model.lm_head.weight")}
    names = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
             "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
             "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    for i in range(t.num_layers):
        o, h = f"language_model.model.layers.{i}.", f"model.layers.{i}."
        for a, b in names.items():
            tensors[h + b + ".weight"] = src.get(o + a + ".weight")
            if t.qkv_bias and a in ("attn.wq", "attn.wk", "attn.wv"):
                tensors[h + b + ".bias"] = src.get(o + a + ".bias")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    print(json.dumps({"hf_folder": str(out_dir), "tensors": len(tensors)}))


def graph_summary(path: Path) -> dict[str, Any]:
    """Op counts, the distinct MatMulNBits settings and the LM head's, of one decoder graph."""
    import onnx
    from onnx.helper import get_attribute_value

    g = onnx.load(str(path), load_external_data=False).graph
    ops: dict[str, int] = {}
    nbits: dict[str, int] = {}
    head = None
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
        if n.op_type in ("MatMulNBits", "MatMul") and "logits" in (*n.output, *n.name.split("/")) \
                or "lm_head" in n.name:
            head = {a.name: get_attribute_value(a) for a in n.attribute}
            head["op"] = n.op_type
        if n.op_type == "MatMulNBits":
            a = {x.name: get_attribute_value(x) for x in n.attribute}
            key = ", ".join(f"{k}={a.get(k)}" for k in ("bits", "block_size", "accuracy_level"))
            nbits[key] = nbits.get(key, 0) + 1
    return {"nodes": len(g.node), "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "matmulnbits": nbits, "lm_head": head}


class GenaiDecoder:
    """onnxruntime-genai's decoder graph driven step by step with a plain ORT session."""

    def __init__(self, folder: Path, threads: int | None, max_len: int,
                 profile: str | None = None, huge_pages: bool = False) -> None:
        import onnxruntime as ort

        from molmo_runtime.huge_pages import collapse_new_memory

        full = json.loads((folder / "genai_config.json").read_text())
        dec = full["model"]["decoder"]
        # genai's own runtime rule: one max-length buffer shared by past and present, or not
        self.share = bool(full.get("search", {}).get("past_present_share_buffer", False))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or 0
        so.log_severity_level = 3
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = profile
        with collapse_new_memory(huge_pages) as self.huge_pages:
            self.sess = ort.InferenceSession(str(folder / dec["filename"]), so,
                                             providers=["CPUExecutionProvider"])
        self.huge_pages.wait()
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.layers, self.kv = dec["num_hidden_layers"], dec["num_key_value_heads"]
        self.hd, self.max_len = dec["head_size"], max_len
        self.past: list[np.ndarray] = []
        self.length = 0

    def start(self) -> None:
        n = self.max_len if self.share else 0
        self.past = [np.zeros((1, self.kv, n, self.hd), np.float32)
                     for _ in range(2 * self.layers)]
        self.length = 0

    def decode(self, ids: np.ndarray) -> np.ndarray:
        seq = ids.shape[1]
        total = self.length + seq
        feeds: dict[str, Any] = {"input_ids": ids,
                                 "attention_mask": np.ones((1, total), np.int64)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(self.length, total, dtype=np.int64)[None]
        names = [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        feeds.update(zip(names, self.past))
        b = self.sess.io_binding()
        for k, v in feeds.items():
            b.bind_cpu_input(k, v)
        b.bind_output("logits")
        for i, name in enumerate(names):
            present = name.replace("past_key_values", "present")
            if self.share:
                a = self.past[i]
                b.bind_output(present, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
            else:
                b.bind_output(present)
        self.sess.run_with_iobinding(b)
        outs = b.get_outputs()
        if not self.share:
            self.past = [o.numpy() for o in outs[1:]]
        self.length = total
        return np.array(outs[0].numpy()[:, -1])


def logits_check(m: Any, emb: np.ndarray, mine: Any, peer: GenaiDecoder,
                 rng: np.random.Generator) -> dict[str, Any]:
    """Both graphs on the same 37 ids (prefill) then 3 steps: the peer holds our weights."""
    ids = rng.integers(0, m.dims.vocab_rows, (1, 40))
    mine.start(1)
    peer.start()
    a = [mine.decode(np.asarray(emb[ids[:, :37]]), np.ones((1, 37), np.int64),
                     np.arange(37, dtype=np.int64)[None])]
    b = [peer.decode(ids[:, :37])]
    for s in range(37, 40):
        a.append(mine.decode(np.asarray(emb[ids[:, s:s + 1]]), np.ones((1, s + 1), np.int64),
                             np.array([[s]], np.int64)))
        b.append(peer.decode(ids[:, s:s + 1]))
    x, y = np.stack(a), np.stack(b)
    return {"max_abs_logits": float(np.abs(x - y).max()), "max_logits": float(np.abs(x).max()),
            "same_top1": bool((x.argmax(-1) == y.argmax(-1)).all())}


# --pages: whose weights go on 2 MiB pages (molmo_runtime.huge_pages). "runtime": ours as our
# runtime runs it, the peer's as a plain session (genai's runtime does not collapse them);
# "none" and "both": the graphs alone on equal pages.
PAGES = {"runtime": (None, False), "none": (False, False), "both": (True, True)}


def time_both(artifact: str, genai_folder: str, ours: str, contexts: list[int], steps: int,
              rounds: int, threads: int | None, pages: str = "runtime") -> dict[str, Any]:
    from molmo_runtime.manifest import load_manifest
    from fused_vs_portable import decoder_backend

    m = load_manifest(artifact, "size")
    emb = np.load(m.path("embed_tokens.npy"), mmap_mode="r")
    ours_huge, peer_huge = PAGES[pages]
    mine = decoder_backend(m, Path(ours), "ort", threads, huge_pages=ours_huge)
    peer = GenaiDecoder(Path(genai_folder), threads, m.dims.max_seq_len, huge_pages=peer_huge)
    rng = np.random.default_rng(0)
    check = logits_check(m, emb, mine, peer, rng)
    pages_used = {"pages": pages, "ours": mine.huge_pages.summary(),
                  "genai": peer.huge_pages.summary()}
    print(json.dumps({"logits_check": check, **pages_used}), flush=True)
    per_round: list[dict[str, dict[str, float]]] = [{"ours": {}, "genai": {}}
                                                    for _ in range(rounds)]
    # as fused_vs_portable.measure: the first context's prefill is timed every round; longer
    # caches are filled once and grow by `steps` positions a round
    for ctx in contexts:
        ids = rng.integers(0, m.dims.vocab_rows, (1, ctx + rounds * (steps + 1)))
        for r in range(rounds):
            res = per_round[r]
            if r == 0 or ctx == contexts[0]:
                mine.start(1)
                peer.start()
                settle()
                t0 = time.perf_counter()
                mine.decode(np.asarray(emb[ids[:, :ctx]]), np.ones((1, ctx), np.int64),
                            np.arange(ctx, dtype=np.int64)[None])
                t1 = time.perf_counter()
                settle()
                t2 = time.perf_counter()
                peer.decode(ids[:, :ctx])
                t3 = time.perf_counter()
                if ctx == contexts[0]:
                    res["ours"][f"prefill_ms@{ctx}"] = (t1 - t0) * 1e3
                    res["genai"][f"prefill_ms@{ctx}"] = (t3 - t2) * 1e3
            a, b = [], []
            first = mine.cache_length
            for s in range(first, first + steps + 1):
                tok = ids[:, s:s + 1]
                ours_ms, peer_ms = 0.0, 0.0
                # who goes first alternates step by step: neither graph always finds the
                # caches and clocks the other one left
                for who in ("ours", "peer") if s % 2 else ("peer", "ours"):
                    settle()  # the other stack's threads stop spinning first
                    t0 = time.perf_counter()
                    if who == "ours":
                        mine.decode(np.asarray(emb[tok]), np.ones((1, s + 1), np.int64),
                                    np.array([[s]], np.int64))
                        ours_ms = (time.perf_counter() - t0) * 1e3
                    else:
                        peer.decode(tok)
                        peer_ms = (time.perf_counter() - t0) * 1e3
                if s > first:  # the first step after a fill is a warm-up
                    a.append(ours_ms)
                    b.append(peer_ms)
            res["ours"][f"decode_ms@{ctx}"] = float(np.median(a))
            res["genai"][f"decode_ms@{ctx}"] = float(np.median(b))
            print(json.dumps({"context": ctx, "round": r, "ours": res["ours"],
                              "genai": res["genai"]}), flush=True)
    summary: dict[str, Any] = {"logits_check": check, **pages_used}
    for key in per_round[0]["ours"]:
        ratios = [x["ours"][key] / x["genai"][key] for x in per_round]
        summary[key] = {
            "ours_median_ms": float(np.median([x["ours"][key] for x in per_round])),
            "genai_median_ms": float(np.median([x["genai"][key] for x in per_round])),
            "ratio_ours_over_genai": {"median": float(np.median(ratios)),
                                      "min": min(ratios), "max": max(ratios)}}
    return summary


def kernel_times(trace: str, steps: int) -> dict[str, Any]:
    """Per decode step (median over the last `steps` runs of an ORT profile): the run's time,
    its kernels' sum, and each weight matmul's time by role (layer index dropped)."""
    import re

    events = json.loads(Path(trace).read_text())
    os.remove(trace)
    runs = [e for e in events if e.get("name") == "model_run"][-steps:]
    nodes = [e for e in events if e.get("cat") == "Node"
             and e.get("name", "").endswith("_kernel_time")]
    per_run: list[dict[str, float]] = []
    for r in runs:
        times: dict[str, float] = {"run": r["dur"] / 1e3, "kernels": 0.0}
        for n in nodes:
            if r["ts"] <= n["ts"] <= r["ts"] + r["dur"]:
                op = n["args"]["op_name"]
                if op in ("MatMul", "MatMulNBits"):  # ours "l3.gate", genai "/model/layers.3/..."
                    role = re.sub(r"^l\d+\.|/model/layers\.\d+/|_kernel_time$", "", n["name"])
                    op = f"{op} {role}"
                times[op] = times.get(op, 0.0) + n["dur"] / 1e3
                times["kernels"] += n["dur"] / 1e3
        per_run.append(times)
    keys = sorted({k for t in per_run for k in t}, key=lambda k: -per_run[-1].get(k, 0.0))
    return {k: round(float(np.median([t.get(k, 0.0) for t in per_run])), 3) for k in keys}


def profile_both(artifact: str, genai_folder: str, ours: str, context: int, steps: int,
                 threads: int | None) -> dict[str, Any]:
    """Both graphs under ORT's profiler, stepped alternately as in `time`: where a difference
    in the step lives (ms a step: wall, inside ORT's run, the kernels, each weight matmul)."""
    from molmo_runtime.manifest import load_manifest
    from fused_vs_portable import decoder_backend

    m = load_manifest(artifact, "size")
    emb = np.load(m.path("embed_tokens.npy"), mmap_mode="r")
    prefix = f"/tmp/genai_peer_{os.getpid()}"
    mine = decoder_backend(m, Path(ours), "ort", threads, profile=prefix + "_ours")
    peer = GenaiDecoder(Path(genai_folder), threads, m.dims.max_seq_len, prefix + "_genai")
    ids = np.random.default_rng(0).integers(0, m.dims.vocab_rows, (1, context + steps))
    mine.start(1)
    peer.start()
    mine.decode(np.asarray(emb[ids[:, :context]]), np.ones((1, context), np.int64),
                np.arange(context, dtype=np.int64)[None])
    peer.decode(ids[:, :context])
    wall: dict[str, list[float]] = {"ours": [], "genai": []}
    for s in range(context, context + steps):
        tok = ids[:, s:s + 1]
        for who in ("ours", "genai") if s % 2 else ("genai", "ours"):
            settle()
            t0 = time.perf_counter()
            if who == "ours":
                mine.decode(np.asarray(emb[tok]), np.ones((1, s + 1), np.int64),
                            np.array([[s]], np.int64))
            else:
                peer.decode(tok)
            wall[who].append((time.perf_counter() - t0) * 1e3)
    out = {"ours": kernel_times(mine.end_profiling(), steps),
           "genai": kernel_times(peer.sess.end_profiling(), steps)}
    for who in out:
        out[who] = {"wall": round(float(np.median(wall[who])), 3), **out[who]}
    return {"context": context, "steps": steps, **out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("model")
    c.add_argument("out")
    s = sub.add_parser("graphs", help="how our fused graph and the peer graph differ")
    s.add_argument("ours", help="our fused decoder .onnx")
    s.add_argument("genai_folder")
    f = sub.add_parser("profile", help="both graphs under ORT's profiler, op by op")
    f.add_argument("artifact", help="the portable fp32 artifact (for dims and embeddings)")
    f.add_argument("genai_folder")
    f.add_argument("--ours", required=True, help="our fused decoder .onnx")
    f.add_argument("--context", type=int, default=450)
    f.add_argument("--steps", type=int, default=100)
    f.add_argument("--threads", type=int, default=None)
    t = sub.add_parser("time")
    t.add_argument("artifact", help="the portable fp32 artifact (for dims and embeddings)")
    t.add_argument("genai_folder")
    t.add_argument("--ours", required=True, help="our fused decoder .onnx")
    t.add_argument("--contexts", default="450,1024")
    t.add_argument("--steps", type=int, default=16)
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--pages", choices=tuple(PAGES), default="runtime",
                   help="whose weights go on 2 MiB pages (see PAGES)")
    t.add_argument("--json", default=None)
    args = p.parse_args()
    if args.cmd == "convert":
        convert(args.model, args.out)
        return 0
    if args.cmd == "graphs":
        peer = json.loads((Path(args.genai_folder) / "genai_config.json").read_text())
        print(json.dumps({"ours": graph_summary(Path(args.ours)), "genai": graph_summary(
            Path(args.genai_folder) / peer["model"]["decoder"]["filename"])}, indent=1))
        return 0
    if args.cmd == "profile":
        report = profile_both(args.artifact, args.genai_folder, args.ours, args.context,
                              args.steps, args.threads)
        print(json.dumps({**report, "load_avg": os.getloadavg(),
                          "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                         indent=1))
        return 0
    load = os.getloadavg()
    summary = time_both(args.artifact, args.genai_folder, args.ours,
                        [int(x) for x in args.contexts.split(",")], args.steps, args.rounds,
                        args.threads, args.pages)
    report = {"summary": summary, "load_avg_before": load, "load_avg_after": os.getloadavg(),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
