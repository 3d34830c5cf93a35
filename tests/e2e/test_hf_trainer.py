"""WMTPTrainer (wmtp.integrations.hf_trainer): Hugging Face's Trainer with wmtp's weighted MTP loss.

One optimizer step under the Trainer (two micro-batches of gradient accumulation, -100 prompt labels, padding) gives
the loss and gradients of wmtp's own step on the same rows, computed here with MTPModel.forward, MTPLoss and the
scheme's own weight function; a few steps save a directory that MTPModel.from_pretrained and AutoModelForCausalLM
load; schemes that need wmtp's own trainer, and other bad input, are one-line errors."""

import copy
import re
from pathlib import Path

import pytest
import torch
from helpers.models import VOCAB, grads_of, perturb_heads, tiny_llama
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from wmtp.config import ConfigError
from wmtp.integrations.hf_trainer import WMTPTrainer, hf_mtp_labels
from wmtp.loss import IGNORE_INDEX, loss_denominator
from wmtp.model.mtp import GradNormScores, MTPLoss, MTPModel
from wmtp.runtime.distributed import DistInfo
from wmtp.weighting.dpace import dpace_weights
from wmtp.weighting.gradnorm import gradnorm_weights

S = 12
N_HEADS = 3


def rows() -> list[dict[str, torch.Tensor]]:
    """Four rows of random tokens: a prompt labelled -100 (2-4 tokens), right padding (mask 0, label -100)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for prompt, pad in [(2, 0), (3, 4), (4, 1), (2, 6)]:
        ids = torch.randint(3, VOCAB, (S,), generator=g)
        mask = torch.ones(S, dtype=torch.long)
        ids[S - pad:] = 0
        mask[S - pad:] = 0
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        labels[mask == 0] = IGNORE_INDEX
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def stacked() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = rows()
    return tuple(torch.stack([r[k] for r in batch]) for k in ("input_ids", "attention_mask", "labels"))


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2, "max_steps": 1, "learning_rate": 1e-3, "max_grad_norm": 0.0,
                "report_to": "none", "use_cpu": True, "save_strategy": "no", "logging_steps": 1,
                "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0}
    return TrainingArguments(**{**settings, **overrides})


def test_hf_labels_ignore_every_pair_whose_target_is_labelled_minus_100():
    ids, mask, hf = stacked()
    got = hf_mtp_labels(ids, hf, N_HEADS, attention_mask=mask)
    for b in range(ids.shape[0]):
        for t in range(S):
            for h in range(N_HEADS):
                j = t + 1 + h
                ok = j < S and bool(mask[b, t]) and bool(mask[b, j]) and int(hf[b, j]) != IGNORE_INDEX
                assert int(got[b, t, h]) == (int(ids[b, j]) if ok else IGNORE_INDEX), (b, t, h)
    # head 0's pairs are Hugging Face's own next-token loss: logits at t against labels[t+1]
    assert torch.equal(got[:, :-1, 0], hf[:, 1:])
    assert (got[:, :, 1:] != IGNORE_INDEX).any()


def test_labels_that_are_not_the_tokens_are_refused():
    ids, mask, hf = stacked()
    hf[0, 5] = (hf[0, 5] + 1) % VOCAB
    with pytest.raises(ValueError, match=r"^WMTPTrainer: labels differ from input_ids where they are not -100"):
        hf_mtp_labels(ids, hf, N_HEADS, attention_mask=mask)


def no_weights(model, ids, mask, labels):
    return None


def dpace_reference(model, ids, mask, labels):
    """D-PACE's weights from the model's own CE on the step's rows (docs/method.md §5.7, alpha 0.5)."""
    with torch.no_grad():
        return dpace_weights(model(ids, mask, MTPLoss(labels)).ce, labels, 0.5)


def gradnorm_reference(model, ids, mask, labels):
    """Gradnorm's weights (temperature 0.5) from a no-grad pass over every row of the step (docs/method.md §5.4):
    per-head statistics over the whole step, not per micro-batch."""
    with torch.no_grad():
        g2 = model(ids, mask, GradNormScores(labels)).grad_norm_sq
    (weights,), _, _, _ = gradnorm_weights([g2.sqrt()], [labels], temperature=0.5, eps=0.05, w_max=3.0,
                                           direction="up", info=DistInfo(0, 1, 0, torch.device("cpu")))
    return weights


class FirstGradients(TrainerCallback):
    """The gradients of the first optimizer step, as the optimizer gets them (clipping is off)."""

    def __init__(self) -> None:
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = grads_of(model)


class LossSpy(WMTPTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append(loss.detach())
        return loss


@pytest.mark.parametrize(("algorithm", "scheme", "head_type", "weights_of"), [
    ("baseline-mtp", None, "transformer", no_weights),
    ("dpace", None, "sequential", dpace_reference),  # weights made inside the training forward
    ("gradnorm", {"gradnorm": {"temperature": 0.5}}, "linear", gradnorm_reference),  # a separate scoring pass
])
def test_one_trainer_step_is_wmtps_step(tmp_path, algorithm, scheme, head_type, weights_of):
    model = MTPModel.from_base(tiny_llama(), N_HEADS, head_type).train()
    perturb_heads(model)
    reference = copy.deepcopy(model)

    # wmtp's step on the same four rows: the weights over the step, Σ coef·CE / Σ denominators (docs/method.md §3).
    # Grouping the rows into micro-batches changes neither, so one forward over all four is the step.
    ids, mask, hf = stacked()
    labels = hf_mtp_labels(ids, hf, N_HEADS, attention_mask=mask)
    weights = weights_of(reference, ids, mask, labels)
    out = reference(ids, mask, MTPLoss(labels, weights, normalizer=loss_denominator(labels)))
    out.loss.backward()
    expected = grads_of(reference)
    valid = labels != IGNORE_INDEX
    head_ce = out.ce.sum((0, 1)) / valid.sum((0, 1))

    gradients = FirstGradients()
    trainer = LossSpy(model=model, args=training_args(tmp_path), train_dataset=rows(), algorithm=algorithm,
                      scheme=scheme, callbacks=[gradients])
    trainer.losses = []
    trainer.train()

    assert len(trainer.losses) == 2  # two micro-batches of the one step
    torch.testing.assert_close(sum(trainer.losses), out.loss.detach(), rtol=1e-5, atol=1e-6)
    assert set(gradients.grads) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(gradients.grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    for h in range(N_HEADS):
        assert logged[f"ce_head{h}"] == pytest.approx(float(head_ce[h]), rel=1e-5)
        assert 0.0 <= logged[f"acc_head{h}"] <= 1.0
    if algorithm != "baseline-mtp":
        assert any(key.startswith(f"{algorithm}/") for key in logged), sorted(logged)


def test_a_few_steps_save_what_mtp_and_hf_load(tmp_path):
    """Rho-1 against a frozen reference, three steps with a checkpoint at step 2; save_model into the output
    directory keeps the checkpoint and writes an MTP model whose base loads as a plain causal LM."""
    model = MTPModel.from_base(tiny_llama(), N_HEADS, "transformer")
    initial = copy.deepcopy(model)
    args = training_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=2)
    trainer = WMTPTrainer(model=model, args=args, train_dataset=rows() * 3, algorithm="rho1",
                          scheme={"rho1": {"mode": "topk"}}, reference_model=tiny_llama(seed=5))
    trainer.train()
    out = tmp_path / "out"
    trainer.save_model()
    assert (out / "checkpoint-2").is_dir()

    ids, mask, hf = stacked()
    model.eval()
    with torch.no_grad():
        trained = model(ids, mask, return_logits=True).logits
        base_logits = model.base(input_ids=ids, attention_mask=mask).logits
        loaded = MTPModel.from_pretrained(out)
        torch.testing.assert_close(loaded(ids, mask, return_logits=True).logits, trained, rtol=0, atol=0)
        plain = AutoModelForCausalLM.from_pretrained(out)
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits, base_logits, rtol=0, atol=0)
        assert not torch.equal(initial(ids, mask, return_logits=True).logits, trained)  # it trained
        MTPModel.from_pretrained(out / "checkpoint-2")  # a checkpoint is a model directory too

        # evaluation: the uniform MTP loss of the batch (one batch of the four rows)
        uniform = model(ids, mask, MTPLoss(hf_mtp_labels(ids, hf, N_HEADS, attention_mask=mask))).loss
    assert trainer.evaluate(eval_dataset=rows())["eval_loss"] == pytest.approx(float(uniform), rel=1e-5)


@pytest.mark.parametrize("algorithm", ["critic", "grpo", "hybrid"])
def test_schemes_that_need_wmtps_trainer_are_refused(tmp_path, algorithm):
    model = MTPModel.from_base(tiny_llama(), N_HEADS)
    with pytest.raises(ConfigError, match=rf"^WMTPTrainer: algorithm: {algorithm} needs wmtp's own trainer") as err:
        WMTPTrainer(model=model, args=training_args(tmp_path), train_dataset=rows(), algorithm=algorithm)
    assert "\n" not in str(err.value) and "baseline-mtp, dpace, gradnorm, rho1" in str(err.value)


@pytest.mark.parametrize(("options", "message"), [
    ({"algorithm": "nope"}, r"^WMTPTrainer: algorithm: unknown `nope` \(choose from "),
    ({"algorithm": "rho1", "scheme": {"rho1": {}}}, r"^WMTPTrainer: reference_model: algorithm rho1 needs a frozen"),
    ({"algorithm": "gradnorm", "reference_model": "ref"}, r"^WMTPTrainer: reference_model: algorithm gradnorm uses "),
    ({"algorithm": "gradnorm", "scheme": {"gradnorm": {"nope": 1}}}, r"^WMTPTrainer scheme: gradnorm\.nope: unknown"),
    ({"algorithm": "dpace", "scheme": {"dpace": {"alpha": 2}}}, r"^WMTPTrainer scheme: dpace\.alpha: "),
])
def test_bad_options_are_one_line_errors(tmp_path, options, message):
    if options.get("reference_model") == "ref":
        options = {**options, "reference_model": tiny_llama(seed=5)}
    with pytest.raises(ConfigError, match=message) as err:
        WMTPTrainer(model=MTPModel.from_base(tiny_llama(), N_HEADS), args=training_args(tmp_path),
                    train_dataset=rows(), **options)
    assert "\n" not in str(err.value)


def test_bad_models_and_runs_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^n_heads must be >= 1, got 0$"):
        MTPModel.from_base(tiny_llama(), 0)
    with pytest.raises(TypeError, match=r"^WMTPTrainer: model is a LlamaForCausalLM, not an MTPModel; add the heads"):
        WMTPTrainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=rows())
    with pytest.raises(ConfigError, match=r"^WMTPTrainer: activation_checkpointing \(gradient_checkpointing\) is not"):
        WMTPTrainer(model=MTPModel.from_base(tiny_llama(), N_HEADS),
                    args=training_args(tmp_path, activation_checkpointing=True), train_dataset=rows())
    trainer = WMTPTrainer(model=MTPModel.from_base(tiny_llama(), N_HEADS), args=training_args(tmp_path),
                          train_dataset=rows())
    with pytest.raises(ConfigError, match=r"^WMTPTrainer: resume_from_checkpoint is not supported"):
        trainer.train(resume_from_checkpoint=True)
    unlabelled = [{k: v for k, v in row.items() if k != "labels"} for row in rows()]
    trainer = WMTPTrainer(model=MTPModel.from_base(tiny_llama(), N_HEADS), args=training_args(tmp_path),
                          train_dataset=unlabelled)
    with pytest.raises(ValueError, match=r"^WMTPTrainer: a batch without `labels`"):
        trainer.train()


def test_the_docs_example_runs(tmp_path, monkeypatch):
    """docs/hf-trainer.md's first python block, as written, in a fresh directory."""
    page = Path(__file__).resolve().parents[2] / "docs" / "hf-trainer.md"
    code = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(page), "exec"), {"__name__": "hf_trainer_example"})
    final = tmp_path / "runs" / "hf-demo" / "final"
    assert (final / "mtp_heads.safetensors").is_file() and (final / "model.safetensors").is_file()


def test_trl_sft_trainer_trains_with_wmtps_loss(tmp_path):
    """TRL's SFTTrainer with WMTPTrainer's loss (docs/hf-trainer.md#trl): prompt/completion rows, TRL's own collator
    and completion-only labels (-100 on the prompt), two steps, then a directory MTPModel.from_pretrained loads."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    class WMTPSFTTrainer(WMTPTrainer, SFTTrainer):
        pass

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([f"def f{i}(x): return x + {i}" for i in range(16)],
                            trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    model = MTPModel.from_base(base, n_heads=N_HEADS)
    model.add_model_tags = model.base.add_model_tags  # TRL tags the model it trains
    data = Dataset.from_list([{"prompt": f"def f{i}(x):", "completion": f" return x + {i}"} for i in range(16)])
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                     report_to="none", use_cpu=True, max_length=32, activation_checkpointing=False,
                     disable_tqdm=True)
    trainer = WMTPSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             data_collator=DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id),
                             algorithm="dpace")
    batch = next(iter(trainer.get_train_dataloader()))
    prompt = (batch["labels"] == IGNORE_INDEX) & batch["attention_mask"].bool()
    assert prompt[:, 0].all() and prompt.sum() > batch["labels"].shape[0]  # the prompts are -100
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(f"ce_head{h}" in logged[0] for h in range(N_HEADS))
    assert "dpace/weight_mean_head1" in logged[0]
    trainer.save_model(str(tmp_path / "final"))
    MTPModel.from_pretrained(tmp_path / "final")
