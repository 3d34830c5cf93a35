"""Where a trained critic puts its weight: mean stage-2 weight per head on clean vs corrupted documents.

Reads a critic run of `experiments/corrupted-corpus/corrupted_corpus.py` (its final model with
value_head.safetensors, and the corpus in the experiment directory), scores the first --sequences training
sequences as one step with the run's own critic settings, and splits the valid pairs by whether their document
parses (clean chunks always do, corrupted ones never do).
Also reports the mean TD error and value on each kind of document.

    python experiments/corrupted-corpus/critic_weights_by_document.py --experiment runs/corrupted-critic \
        --run critic-parses-seed0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from wmtp.data.sequences import build_sequences, tokenize_examples  # noqa: E402
from wmtp.data.sources import Example  # noqa: E402
from wmtp.loss import IGNORE_INDEX, mtp_labels, per_target_to_heads  # noqa: E402
from wmtp.model.mtp import MTPModel  # noqa: E402
from wmtp.runtime.distributed import DistInfo  # noqa: E402
from wmtp.weighting.critic.returns import gae, td_errors, token_rewards  # noqa: E402
from wmtp.weighting.critic.scheme import CriticSettings, critic_weights  # noqa: E402
from wmtp.weighting.critic.value import load_value_head  # noqa: E402
from wmtp.weighting.rewards import parses_as_python  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", type=Path, required=True)
    p.add_argument("--run", default="critic-parses-seed0")
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--advantage", choices=["td", "gae"], default="td", help="the run's critic.advantage")
    p.add_argument("--lam", type=float, default=0.95, help="the run's critic.lam")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    final = args.experiment / args.run / "final"
    model = MTPModel.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    head, meta = load_value_head(final, model.config.hidden_size)
    head.eval()
    settings = CriticSettings(reward={"kind": "verifiable", "check": "parses"}, advantage=args.advantage, lam=args.lam)
    texts = [json.loads(line)["text"] for line in (args.experiment / "train.jsonl").read_text().splitlines()]
    examples = [Example("", t, "jsonl", f"train/{i}") for i, t in enumerate(texts)]
    clean = torch.tensor([parses_as_python(t) for t in texts], dtype=torch.float32)
    seqs = build_sequences(tokenize_examples(examples, tokenizer), args.max_length, packing=True,
                           pad_id=tokenizer.pad_token_id, seed=0)
    rows = torch.arange(min(args.sequences, len(seqs)))
    batch = seqs.select(rows)
    tr = token_rewards(seqs, clean[seqs.doc_examples]).select(rows, torch.device("cpu"))
    labels = mtp_labels(batch["input_ids"], model.n_heads, attention_mask=batch["attention_mask"],
                        document_ids=batch["document_ids"])
    with torch.no_grad():
        values = head(model(batch["input_ids"], batch["attention_mask"]).trunk_hidden)
    delta, defined = td_errors(values, tr, batch["attention_mask"], batch["document_ids"], settings.gamma)
    signal = delta if settings.advantage == "td" else gae(delta, defined, settings.gamma, settings.lam)
    (weights,), _, _ = critic_weights([per_target_to_heads(signal, model.n_heads)], [labels],
                                      temperature=settings.temperature, eps=settings.eps, w_max=settings.w_max,
                                      info=DistInfo(0, 1, 0, torch.device("cpu")))
    doc_clean = tr.doc_reward.bool()  # per position: does its document parse
    valid_positions = batch["attention_mask"].bool()
    print(f"{args.run}: {len(rows)} sequences; value head {meta.get('status', 'stage 2')}")
    print("| documents | positions | mean V | mean δ | " + " | ".join(f"mean w head {h}" for h in range(model.n_heads))
          + " |")
    print("|---|---|---|---|" + "---|" * model.n_heads)
    for name, mask in (("clean (parse)", doc_clean), ("corrupted", ~doc_clean)):
        pos = valid_positions & mask
        ws = []
        for h in range(model.n_heads):
            pairs = (labels[..., h] != IGNORE_INDEX) & mask
            ws.append(f"{float(weights[..., h][pairs].mean()):.3f}")
        print(f"| {name} | {int(pos.sum())} | {float(values[pos].mean()):.3f} | "
              f"{float(delta[defined & mask].mean()):+.4f} | " + " | ".join(ws) + " |")
    end = per_target_to_heads(tr.terminal.float(), model.n_heads).bool()  # pairs whose target ends a document
    for name, where in (("targets that end a document", end), ("all other targets", ~end)):
        cells = []
        for h in range(model.n_heads):
            pairs = (labels[..., h] != IGNORE_INDEX) & where[..., h]
            cells.append(f"{float(weights[..., h][pairs].mean()):.3f} (max {float(weights[..., h][pairs].max()):.1f})"
                         if pairs.any() else "—")
        print(f"| {name} | {int(((labels != IGNORE_INDEX) & where).sum())} pairs | | | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
