"""Peak memory per rank against the memory plan (`wmtp plan`), for 1 and 2 processes and several model sizes.

Each case runs in fresh processes (gloo on CPU, or one CUDA device per rank): set-up, then `--steps` training steps
of a from-scratch Llama-family model on packed standard-library text (full rows, so attention takes its
flash path). Measured per rank:
- CUDA: `torch.cuda.max_memory_allocated()` over the steps;
- CPU: the growth of the resident set from just before the model is built to the peak of the steps
  (`ru_maxrss`), which also holds the allocator's and the process's own overhead.
The plan's estimate for the same config stands beside each measurement, with the ratio.

    python benchmarks/scale.py --out benchmarks/results/scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # hidden, layers, heads, kv heads, intermediate
    "small": (256, 4, 4, 4, 688),
    "medium": (512, 8, 8, 8, 1376),
    "large": (768, 12, 12, 12, 2048),
}


def case_files(directory: Path, size: str, strategy: str, checkpointing: str, device: str) -> tuple[Path, Path]:
    hidden, layers, heads, kv, inter = SIZES[size]
    config = {"model": {"from_scratch": {"hidden_size": hidden, "num_layers": layers, "num_attention_heads": heads,
                                         "num_key_value_heads": kv, "intermediate_size": inter,
                                         "max_position_embeddings": 1024, "tie_word_embeddings": False},
                        "train_tokenizer": {"vocab_size": 8192}},
              "output_dir": str(directory / "runs"),
              "compute": {"device": device, "distributed": strategy, "activation_checkpointing": checkpointing,
                          "threads": 1},
              "mlflow": {"enabled": False}, "logging": {"progress": False}}
    recipe = {"algorithm": "baseline-mtp", "mtp": {"n_heads": 4},
              "data": {"train": [{"kind": "python-stdlib", "limit": 150}], "validation_fraction": 0.0,
                       "max_length": 512},
              "train": {"micro_batch_size": 4, "max_steps": 10}}
    paths = directory / "config.json", directory / "recipe.json"
    paths[0].write_text(json.dumps(config))
    paths[1].write_text(json.dumps(recipe))
    return paths


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mark_model_build(info) -> dict:
    """Make the set-up read the resident set (and, on CUDA, reset the peak and read the allocated memory) just
    before it builds the model; returns the dict it fills (`rss`, `cuda`)."""
    import torch

    from wmtp.training import build as setup_module

    before = {}
    build = setup_module.build_model

    def build_and_mark(*args, **kwargs):
        before["rss"] = resident_bytes()
        if info.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before["cuda"] = torch.cuda.memory_allocated()
        return build(*args, **kwargs)

    setup_module.build_model = build_and_mark
    return before


def measure(config_path: str, recipe_path: str, steps: int, out: str) -> None:
    """One rank: set-up (measuring the resident set just before the model), steps, and the peak."""
    import torch

    from wmtp.config import load_config, load_recipe
    from wmtp.runtime import distributed as dist_utils
    from wmtp.training import build as setup_module
    from wmtp.training.trainer import Trainer

    config, recipe = load_config(config_path), load_recipe(recipe_path)
    info = dist_utils.init_distributed(config.compute.device)
    before = mark_model_build(info)
    setup = setup_module.prepare(config, recipe, info)
    trainer = Trainer(setup, Path(tempfile.mkdtemp()), run_name="scale")
    for _ in range(steps):
        trainer.train_step()
        trainer.step += 1
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"rank": info.rank, "cpu_peak_growth": peak_rss - before["rss"]}
    if info.device.type == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated() - before["cuda"]
    Path(f"{out}.rank{info.rank}.json").write_text(json.dumps(result))
    dist_utils.shutdown()


def run_case(size: str, world: int, strategy: str, checkpointing: str, device: str, steps: int) -> dict:
    from wmtp.config import load_config, load_recipe
    from wmtp.model.memory import memory_plan

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        config_path, recipe_path = case_files(directory, size, strategy, checkpointing, device)
        out = str(directory / "measured")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        inner = [str(Path(__file__).resolve()), "--measure", str(config_path), str(recipe_path), str(steps), out]
        command = ([sys.executable, *inner] if world == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                    *inner])
        subprocess.run(command, check=True, env=env, capture_output=True, text=True)
        ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]
        plan, _ = memory_plan(load_config(config_path), load_recipe(recipe_path), world, 8192)
    key = "cuda_peak" if device == "cuda" else "cpu_peak_growth"
    measured = max(r[key] for r in ranks)
    return {"size": size, "world_size": world, "strategy": strategy, "activation_checkpointing": checkpointing,
            "params": plan.params_total, "estimate": plan.device, "measured": measured, "measure": key,
            "ratio": measured / plan.device,
            "components": {k: getattr(plan, k) for k in ("parameters", "gradients", "optimizer", "gathered",
                                                         "activations", "loss")}}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        measure(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    args = parser.parse_args()
    cases = []
    for size in args.sizes:
        for world, strategy, checkpointing in ((1, "ddp", "none"), (1, "ddp", "all"), (2, "ddp", "none"),
                                               (2, "fsdp2", "none")):
            if world not in args.worlds:
                continue
            case = run_case(size, world, strategy, checkpointing, args.device, args.steps)
            cases.append(case)
            print(f"{size:<7} {world} x {strategy:<5} checkpointing {checkpointing:<4} {case['params'] / 1e6:6.1f}M "
                  f"estimate {case['estimate'] / 2**20:8.1f} MiB  measured {case['measured'] / 2**20:8.1f} MiB  "
                  f"ratio {case['ratio']:.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "steps": args.steps, "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
