"""The controlled corrupted-corpus experiment: does a weighting scheme learn clean text better than plain MTP
when a known fraction of the training documents is noise?

Set-up (all offline, deterministic given --data-seed):
- documents: the Python standard library cut into chunks of about --doc-chars characters, at blank lines
  (`--chunking blank-lines`, the Rho-1 run) or at top-level statements (`--chunking top-level`: every clean
  chunk is valid Python on its own, which the critic's `parses` reward needs); each chunk goes by a hash of
  its name to one of three disjoint pools: reference (clean), train, validation.
- a byte-level BPE tokenizer is trained on the clean reference pool only and shared by every run.
- corruption: --corrupt-fraction of the training documents (chosen with --data-seed) get --token-noise of
  their tokens replaced by tokens drawn uniformly from the vocabulary; the rest stay clean.
- a next-token reference (n_heads 1) is trained on the clean reference pool only.
- critic-parses: Critic-WMTP whose verifiable reward is 1 when a document parses as Python, else 0 (stage 1:
  --critic-pretrain-steps value-head steps on the frozen trunk; it needs no reference model).
- each variant (baseline-mtp, rho1-weighted, rho1-topk, critic-parses) trains the same model on the corrupted
  set for the same number of steps, once per --seeds value (model init and batch order), and is evaluated on
  the clean validation pool: val/loss (mean CE over all heads) and head 0's CE.

    python experiments/corrupted-corpus/corrupted_corpus.py --out runs/corrupted --seeds 0 1 2
    python experiments/corrupted-corpus/corrupted_corpus.py --out runs/corrupted-critic --chunking top-level \
        --variants baseline-mtp critic-parses

`--data-only` writes the corpus, the tokenizer and nothing else (the critic demo uses it).

prints a table of mean ± std (sample std over seeds) and writes results.json in --out.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from wmtp.config import Config, Recipe  # noqa: E402
from wmtp.data.sequences import train_bpe_tokenizer  # noqa: E402
from wmtp.data.sources import stdlib_files  # noqa: E402
from wmtp.evaluate.report import write_json  # noqa: E402
from wmtp.runtime.distributed import DistInfo, resolve_device  # noqa: E402
from wmtp.training.build import prepare  # noqa: E402
from wmtp.training.trainer import Trainer  # noqa: E402
from wmtp.weighting.rewards import parses_as_python  # noqa: E402

MODEL = {"hidden_size": 192, "num_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2,
         "intermediate_size": 512, "max_position_embeddings": 1024, "tie_word_embeddings": True}

# Recipe overrides per variant, on top of the shared training settings below.
VARIANTS = {
    "baseline-mtp": {"algorithm": "baseline-mtp"},
    "rho1-weighted": {"algorithm": "rho1", "rho1": {"mode": "weighted"}},
    "rho1-topk": {"algorithm": "rho1", "rho1": {"mode": "topk", "keep_fraction": 0.6}},
    "critic-parses": {"algorithm": "critic", "critic": {"reward": {"kind": "verifiable", "check": "parses"}}},
    # GAE with λ = 1 carries the end-of-document reward surprise back to every token of the document
    "critic-parses-gae": {"algorithm": "critic", "critic": {"reward": {"kind": "verifiable", "check": "parses"},
                                                            "advantage": "gae", "lam": 1.0}},
    "gradnorm-up": {"algorithm": "gradnorm", "gradnorm": {"direction": "up"}},
    "gradnorm-down": {"algorithm": "gradnorm", "gradnorm": {"direction": "down"}},
    # learnable pairs (Rho-1) that are not outliers of the model's own gradient (gradnorm down)
    "hybrid-rho1-gradnorm-down": {"algorithm": "hybrid", "hybrid": {"components": ["rho1", "gradnorm"]},
                                  "rho1": {"mode": "weighted"}, "gradnorm": {"direction": "down"}},
}


def uses_reference(variant: str) -> bool:
    v = VARIANTS[variant]
    return v["algorithm"] == "rho1" or "rho1" in v.get("hybrid", {}).get("components", [])


def pool_of(name: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return "reference" if bucket < 0.45 else "train" if bucket < 0.9 else "validation"


def top_level_chunks(text: str, max_chars: int) -> list[str]:
    """Consecutive top-level statements of a module joined up to about `max_chars` (a longer statement stays
    whole); every chunk is valid Python on its own. A file that does not parse gives nothing."""
    try:
        nodes = ast.parse(text).body
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    out, current = [], ""
    for node in nodes:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        piece = "".join(lines[start:node.end_lineno])
        if current and len(current) + len(piece) > max_chars:
            out.append(current)
            current = ""
        current += piece if not current else "\n" + piece
    if current.strip():
        out.append(current)
    return [c for c in out if len(c.strip()) > 40 and len(c) <= 3 * max_chars]


def chunks(text: str, max_chars: int) -> list[str]:
    """Consecutive blank-line-separated blocks of `text`, joined up to `max_chars` (a longer block is cut)."""
    out, current = [], ""
    for block in re.split(r"\n\s*\n", text):
        while len(block) > max_chars:
            out.append(block[:max_chars])
            block = block[max_chars:]
        if current and len(current) + len(block) + 2 > max_chars:
            out.append(current)
            current = ""
        current = f"{current}\n\n{block}" if current else block
    if current.strip():
        out.append(current)
    return [c for c in out if len(c.strip()) > 40]


def build_pools(args) -> dict[str, list[str]]:
    pools: dict[str, list[str]] = {"reference": [], "train": [], "validation": []}
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        cut = chunks if args.chunking == "blank-lines" else top_level_chunks
        for i, chunk in enumerate(cut(text, args.doc_chars)):
            pools[pool_of(f"{path.name}/{i}")].append(chunk)
    limits = {"reference": args.reference_docs, "train": args.train_docs, "validation": args.validation_docs}
    return {name: docs[:limits[name]] for name, docs in pools.items()}


def corrupt(docs: list[str], tokenizer, args) -> tuple[list[str], list[bool]]:
    rng = random.Random(args.data_seed)
    n_bad = round(args.corrupt_fraction * len(docs))
    bad = set(rng.sample(range(len(docs)), n_bad))
    vocab = len(tokenizer)
    out = []
    for i, doc in enumerate(docs):
        if i not in bad:
            out.append(doc)
            continue
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        ids = [rng.randrange(2, vocab) if rng.random() < args.token_noise else t for t in ids]  # 0,1: specials
        out.append(tokenizer.decode(ids))
    return out, [i in bad for i in range(len(docs))]



def write_jsonl(path: Path, docs: list[str]) -> None:
    with path.open("w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")


def run(name: str, out: Path, config: dict, recipe: dict, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    cfg, rec = Config.model_validate(config), Recipe.model_validate(recipe)
    info = DistInfo(0, 1, 0, resolve_device(cfg.compute.device))
    setup = prepare(cfg, rec, info)
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = Trainer(setup, run_dir, run_name=name).run()
    print(f"{name}: val/loss {result['eval']['val/loss']:.4f}  ce_head0 {result['eval']['val/ce_head0']:.4f}  "
          f"({time.monotonic() - started:.0f}s)", flush=True)
    return {"eval": result["eval"], "final_model": result["final_model"], "seconds": time.monotonic() - started}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/corrupted-corpus"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--corrupt-fraction", type=float, default=0.5, help="fraction of training documents corrupted")
    p.add_argument("--token-noise", type=float, default=0.5, help="fraction of a corrupted document's tokens replaced")
    p.add_argument("--doc-chars", type=int, default=1500)
    p.add_argument("--chunking", choices=["blank-lines", "top-level"], default="blank-lines")
    p.add_argument("--critic-pretrain-steps", type=int, default=100)
    p.add_argument("--data-only", action="store_true", help="write the corpus and tokenizer, train nothing")
    p.add_argument("--reference-docs", type=int, default=3000)
    p.add_argument("--train-docs", type=int, default=3000)
    p.add_argument("--validation-docs", type=int, default=300)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--reference-steps", type=int, default=300)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default: at the end)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes; use --threads 1)")
    p.add_argument("--hidden-size", type=int, default=MODEL["hidden_size"])
    p.add_argument("--num-layers", type=int, default=MODEL["num_layers"])
    p.add_argument("--intermediate-size", type=int, default=MODEL["intermediate_size"])
    p.add_argument("--attention-heads", type=int, default=MODEL["num_attention_heads"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    pools = build_pools(args)
    tok_dir = out / "tokenizer"
    tokenizer = train_bpe_tokenizer(pools["reference"], args.vocab, 2)
    tokenizer.save_pretrained(str(tok_dir))
    train_docs, is_bad = corrupt(pools["train"], tokenizer, args)
    for name, docs in (("reference", pools["reference"]), ("train", train_docs), ("validation", pools["validation"])):
        write_jsonl(out / f"{name}.jsonl", docs)
    print(f"documents: reference {len(pools['reference'])} (clean), train {len(train_docs)} "
          f"({sum(is_bad)} corrupted, {args.token_noise:.0%} of their tokens random), "
          f"validation {len(pools['validation'])} (clean)", flush=True)
    parses = [parses_as_python(doc) for doc in train_docs]
    print(f"train documents that parse as Python: clean {sum(p for p, b in zip(parses, is_bad, strict=True) if not b)}"
          f"/{len(is_bad) - sum(is_bad)}, corrupted {sum(p for p, b in zip(parses, is_bad, strict=True) if b)}"
          f"/{sum(is_bad)}", flush=True)
    if args.data_only:
        return 0

    def config(seed: int, reference: Path | None = None) -> dict:
        model = {**MODEL, "hidden_size": args.hidden_size, "num_layers": args.num_layers,
                 "intermediate_size": args.intermediate_size, "num_attention_heads": args.attention_heads}
        c = {"model": {"from_scratch": model, "tokenizer": str(tok_dir)},
             "datasets": {n: str(out / f"{n}.jsonl") for n in pools},
             "output_dir": str(out), "compute": {"device": args.device, "precision": args.precision, "seed": seed},
             "checkpoint": {"every_steps": 10_000, "keep_last": 1},
             # several runs in parallel would share one sqlite store: with --jobs > 1 the runs keep only their own
             # records (run.json, metrics.jsonl), which `wmtp compare` reads
             "mlflow": {"enabled": args.jobs == 1, "experiment": "corrupted-corpus",
                        "tracking_uri": f"sqlite:///{out}/mlflow.db"},
             "logging": {"log_every": 50, "progress": False}}
        if reference is not None:
            c["reference_model"] = {"path": str(reference)}
        return c

    def recipe(train: str, steps: int, n_heads: int, seed: int, **override) -> dict:
        r = {"mtp": {"n_heads": n_heads, "head_type": "transformer"},
             "data": {"train": [{"kind": "jsonl", "dataset": train}],
                      "validation": [{"kind": "jsonl", "dataset": "validation"}],
                      "max_length": args.max_length, "packing": True, "shuffle_seed": seed},
             "optim": {"lr": args.lr, "weight_decay": 0.1, "grad_clip": 1.0},
             "schedule": {"kind": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1},
             "train": {"micro_batch_size": args.batch, "max_steps": steps, "eval_every": args.eval_every or steps}}
        r.update(override)
        if r.get("algorithm") == "critic":
            r["pretrain"] = {"max_steps": args.critic_pretrain_steps, "lr": 1e-3, "eval_every": 20,
                             "early_stopping": "loss"}
        return r

    started = time.monotonic()
    needs_reference = any(uses_reference(v) for v in args.variants)
    reference = (run("reference", out, config(0), recipe("reference", args.reference_steps, 1, 0))
                 if needs_reference else None)
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    grid = [(seed, variant) for seed in args.seeds for variant in args.variants]
    jobs = {}
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for seed, variant in grid:
            ref_path = Path(reference["final_model"]) if reference is not None and uses_reference(variant) else None
            jobs[seed, variant] = pool.submit(run, f"{variant}-seed{seed}", out, config(seed, ref_path),
                                              recipe("train", args.steps, args.n_heads, seed, **VARIANTS[variant]),
                                              args.threads)
        for (_, variant), job in jobs.items():
            results[variant].append(job.result())

    def stats(variant: str, key: str) -> tuple[float, float]:
        values = [r["eval"][key] for r in results[variant]]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")

    lines = [f"| variant | val/loss (all {args.n_heads} heads) | head-0 CE | seeds |", "|---|---|---|---|"]
    for variant in args.variants:
        (m, s), (m0, s0) = stats(variant, "val/loss"), stats(variant, "val/ce_head0")
        lines.append(f"| {variant} | {m:.4f} ± {s:.4f} | {m0:.4f} ± {s0:.4f} | {len(results[variant])} |")
    table = "\n".join(lines)
    if reference:
        print(f"\nreference (clean, next-token): val CE {reference['eval']['val/ce_head0']:.4f}")
    print(table)
    print(f"total {time.monotonic() - started:.0f}s; torch {torch.__version__}, {torch.get_num_threads()} threads")
    summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "reference": reference, "results": results, "table": table, "torch": torch.__version__,
               "argv": sys.argv}
    write_json(out / "results.json", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
