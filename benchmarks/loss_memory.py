"""Peak memory and time of one training step: plain next-token loss vs naive and fast n=4 MTP loss.

For each shape (a SmolLM2-135M-wide Llama built from a config: random init, no downloads) it measures one
forward + backward (no optimizer step) of each variant, all on the same weights and batch:

- `plain`: Hugging Face's own next-token loss, `base(input_ids=x, labels=x).loss.backward()`;
- `naive n=4`: `weighted_mtp_loss(model(x, return_logits=True).logits, labels)`, materialising [B, S, n, V];
- `fast n=4`: `model(x, objective=MTPLoss(labels)).loss` (the fused chunked path), once per `--chunk-size` value.

Time: one subprocess runs a warm-up round, then `--repeats` rounds of one step per variant (round-robin, so
load from other processes hits all variants alike); median per variant. Peak extra memory: one fresh
subprocess per variant runs a warm-up step, then one step while a thread samples the process RSS
(/proc/self/statm) every 1 ms; reported is the peak minus the RSS just before the step (activations, logits,
parameter gradients: these are set to None before each step). Those children run with MALLOC_MMAP_THRESHOLD_
fixed so that glibc returns freed tensors to the OS and RSS follows live memory. On CUDA: max_memory_allocated()
minus memory_allocated() before the step.

Run by hand: `.venv/bin/python benchmarks/loss_memory.py` (a few minutes on 2 CPU cores);
`--device cuda --dtype bfloat16 --layers 30 --seq 2048` for a GPU-sized run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from wmtp import MTPLoss, MTPModel, mtp_labels, weighted_mtp_loss

N_HEADS = 4
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def llama_config(args: argparse.Namespace, vocab: int) -> LlamaConfig:
    """SmolLM2-135M width (576 / 1536, 9 heads, 3 kv heads, tied embeddings) with `args.layers` layers."""
    return LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max(args.seq, 2048),
                       tie_word_embeddings=True)


def forward_flops_per_token(cfg: LlamaConfig, seq: int, n_heads: int) -> int:
    """Matmul FLOPs of one forward per token: (L + n - 1) decoder layers and n unembeddings.

    Attention scores and values count 2*2*seq*hidden per layer, i.e. the full sequence (an upper bound that
    ignores causal masking). A training step is 3x this; the ratios below do not depend on that factor.
    """
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    layer = 2 * (2 * d * d + 2 * d * kv) + 2 * 3 * d * cfg.intermediate_size + 2 * 2 * seq * d
    return (cfg.num_hidden_layers + n_heads - 1) * layer + n_heads * 2 * d * cfg.vocab_size


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_extra_memory(step: Callable[[], None], device: torch.device) -> int:
    """Bytes the step needs on top of what was allocated just before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = peak = rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    step()
    done.set()
    sampler.join()
    return max(peak, rss_bytes()) - before


def variant_steps(args: argparse.Namespace, vocab: int, device: torch.device) -> tuple[dict, nn.Module]:
    """One training step (forward + backward) per variant, all on the same weights; and the module to zero."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(args, vocab)).to(device=device, dtype=getattr(torch, args.dtype)).train()
    model = MTPModel.from_base(base, n_heads=N_HEADS).train()  # shares the base model's modules
    x = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    labels = mtp_labels(x, N_HEADS)
    steps: dict[str, Callable[[], None]] = {
        "plain": lambda: base(input_ids=x, labels=x).loss.backward(),
        "naive": lambda: weighted_mtp_loss(model(x, return_logits=True).logits, labels).backward(),
    }
    for chunk in args.chunk_size:
        steps[f"fast:{chunk}"] = lambda c=chunk: model(x, objective=MTPLoss(labels, chunk_size=c)).loss.backward()
    return steps, model


def child(args: argparse.Namespace) -> None:
    """`--child time VOCAB`: median step time of every variant, steps interleaved round-robin so that load from
    other processes hits all variants alike. `--child VARIANT VOCAB`: peak extra memory of one step of one
    variant, after a warm-up step, in this fresh process. Prints JSON."""
    job, vocab = args.child[0], int(args.child[1])
    device = torch.device(args.device)
    steps, module = variant_steps(args, vocab, device)

    def fresh() -> None:
        module.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if job != "time":
        fresh()
        steps[job]()  # warm-up
        fresh()
        print(json.dumps({"peak": peak_extra_memory(steps[job], device)}))
        return
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.repeats + 1):  # round 0 is the warm-up
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            fresh()
            start = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                times[name].append(time.perf_counter() - start)
    print(json.dumps(times))


def run_child(args: argparse.Namespace, job: str, vocab: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--dtype", args.dtype,
           "--layers", str(args.layers), "--seq", str(args.seq), "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--chunk-size", *map(str, args.chunk_size), "--child", job, str(vocab)]
    # A fixed mmap threshold makes glibc return freed tensors to the OS, so RSS follows live memory; the
    # timing child keeps glibc's default (and faster) behaviour.
    env = os.environ if job == "time" else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} (vocab {vocab}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report_shape(args: argparse.Namespace, vocab: int) -> None:
    cfg = llama_config(args, vocab)
    flops = {1: forward_flops_per_token(cfg, args.seq, 1), N_HEADS: forward_flops_per_token(cfg, args.seq, N_HEADS)}
    tokens, size = args.batch * args.seq, torch.finfo(getattr(torch, args.dtype)).bits // 8
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    layer_params = 2 * d * d + 2 * d * kv + 3 * d * cfg.intermediate_size + 2 * d  # projections, MLP, two norms
    grads = {n: ((args.layers + n - 1) * layer_params + (vocab + 1) * d) * size / MIB for n in (1, N_HEADS)}
    print(f"\n## vocab {vocab}, seq {args.seq}, batch {args.batch}, layers {args.layers}, n={N_HEADS}: "
          f"step GFLOP plain {3 * flops[1] * tokens / 1e9:.1f}, n={N_HEADS} {3 * flops[N_HEADS] * tokens / 1e9:.1f}; "
          f"parameter gradients (part of peak extra memory) plain {grads[1]:.0f} MiB, n={N_HEADS} "
          f"{grads[N_HEADS]:.0f} MiB; [B, S, V] logits {tokens * vocab * 4 / MIB:.0f} MiB in fp32", flush=True)
    times = run_child(args, "time", vocab)
    peaks = {job: run_child(args, job, vocab)["peak"] for job in times}
    header = ["variant", "step time (s)", "time ratio vs plain", "FLOP ratio vs plain", "time ratio / FLOP ratio",
              "peak extra memory (MiB)", "memory ratio vs plain"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    med = {job: statistics.median(t) for job, t in times.items()}
    for job in times:
        n = 1 if job == "plain" else N_HEADS
        name = {"plain": "plain", "naive": f"naive n={N_HEADS}"}.get(job, f"fast n={N_HEADS} (chunk {job[5:]})")
        t_ratio, f_ratio, m_ratio = med[job] / med["plain"], flops[n] / flops[1], peaks[job] / peaks["plain"]
        all_times = ", ".join(f"{t:.2f}" for t in times[job])
        print(f"| {name} | {med[job]:.2f} ({all_times}) | {t_ratio:.2f} | {f_ratio:.2f} | {t_ratio / f_ratio:.2f} | "
              f"{peaks[job] / MIB:.0f} | {m_ratio:.2f} |")
    for job in (j for j in times if j.startswith("fast")):
        m_ratio, tf = peaks[job] / peaks["plain"], med[job] / med["plain"] / (flops[N_HEADS] / flops[1])
        print(f"- fast n={N_HEADS} (chunk {job[5:]}): memory {m_ratio:.2f}x plain (target <= 1.15: "
              f"{'met' if m_ratio <= 1.15 else 'MISSED'}); time ratio / FLOP ratio {tf:.2f} (target <= 1.10: "
              f"{'met' if tf <= 1.10 else 'MISSED'})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 49152], help="one shape per vocabulary size")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up; median reported")
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[256], help="fast-path chunk size(s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    start = time.perf_counter()
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"device {args.device} ({device}), dtype {args.dtype}")
    print("time: median of --repeats steps (all steps in parentheses); memory: peak extra over the step "
          f"({'max_memory_allocated' if args.device == 'cuda' else 'RSS sampled every 1 ms'}); "
          "FLOPs: matmuls only, attention at full seq (upper bound)")
    for vocab in args.vocab:
        report_shape(args, vocab)
    print(f"\nwall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
